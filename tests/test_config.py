"""Server settings: one name spelled three ways (flag, SHARDSTORE_SERVE_*, config key), flag > env > file > default."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardstore.cli import build_parser
from shardstore.config import make_configurable, resolve
from shardstore.errors import InvalidInputError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def serve_args(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    args = build_parser().parse_args(["serve", *argv])
    resolve(args, environ)
    return args


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('port = 7001\ncache_size = "64MiB"\ngrace = 3\nhost = "0.0.0.0"\n')
    env = {"SHARDSTORE_SERVE_CONFIG": str(config), "SHARDSTORE_SERVE_PORT": "7002",
           "SHARDSTORE_SERVE_CACHE_SIZE": "32MiB"}
    args = serve_args(["--cache-size", "16MiB"], env)
    assert args.cache_size == 16 << 20  # flag
    assert args.port == 7002  # env over file
    assert args.grace == 3.0 and args.host == "0.0.0.0"  # file over default
    assert args.max_rate is None and args.log_format == "text"  # defaults
    assert args.config == str(config)


def test_a_flag_equal_to_its_default_still_wins(tmp_path: Path) -> None:
    # The case that comparing values with defaults gets wrong: --port 50051 *is* the default.
    args = serve_args(["--port", "50051", "--log-format", "text"],
                      {"SHARDSTORE_SERVE_PORT": "7002", "SHARDSTORE_SERVE_LOG_FORMAT": "json"})
    assert args.port == 50051 and args.log_format == "text"


def test_config_flag_beats_config_env(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("port: 1111\n")
    (tmp_path / "b.yaml").write_text("port: 2222\n")
    args = serve_args(["--config", str(tmp_path / "b.yaml")], {"SHARDSTORE_SERVE_CONFIG": str(tmp_path / "a.yaml")})
    assert args.port == 2222


def test_an_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    (tmp_path / "serve.toml").write_text("port = 7001\n")
    args = serve_args([], {"SHARDSTORE_SERVE_CONFIG": str(tmp_path / "serve.toml"), "SHARDSTORE_SERVE_PORT": "",
                           "SHARDSTORE_SERVE_METRICS_PORT": ""})
    assert args.port == 7001 and args.metrics_port is None


def test_the_clients_cache_size_is_not_the_servers() -> None:
    # SHARDSTORE_CACHE_SIZE bounds the client's disk cache (docs/grpc.md); serve must not read it.
    args = serve_args([], {"SHARDSTORE_CACHE_SIZE": "1KiB"})
    assert args.cache_size == 256 << 20


def test_storage_options_add_up_file_env_flags_last_wins(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("storage_option:\n  endpoint_url: http://file:9000\n  anon: false\n  max_concurrency: 4\n")
    env = {"SHARDSTORE_SERVE_CONFIG": str(config),
           "SHARDSTORE_SERVE_STORAGE_OPTION": "endpoint_url=http://env:9000 'client_kwargs={\"region_name\": \"x\"}'"}
    args = serve_args(["-o", "max_concurrency=8"], env)
    options = dict(args.storage_options)
    assert options == {"endpoint_url": "http://env:9000", "anon": False, "max_concurrency": 8,
                       "client_kwargs": {"region_name": "x"}}


def test_resolving_twice_changes_nothing(tmp_path: Path) -> None:
    env = {"SHARDSTORE_SERVE_STORAGE_OPTION": "a=1", "SHARDSTORE_SERVE_PORT": "9"}
    args = serve_args(["-o", "b=2"], env)
    resolve(args, env)
    assert args.storage_options == [("a", 1), ("b", 2)] and args.port == 9


def test_options_added_later_get_env_and_file_forms(tmp_path: Path) -> None:
    """Generic over the parser: a switch, a typed option with choices, a repeatable one."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--require-thing", action="store_true")
    parser.add_argument("--workers", type=int, choices=[1, 2, 4], default=1)
    parser.add_argument("--tag", action="append", default=[])
    parser.add_argument("--json", action="store_true")
    table = make_configurable(parser, "demo")
    assert {s.flag: (s.env, s.key) for s in table.settings} == {
        "--require-thing": ("SHARDSTORE_DEMO_REQUIRE_THING", "require_thing"),
        "--workers": ("SHARDSTORE_DEMO_WORKERS", "workers"),
        "--tag": ("SHARDSTORE_DEMO_TAG", "tag"),
    }  # --json says how to print, not how to behave: no env or file form
    config = tmp_path / "demo.toml"
    config.write_text('require_thing = true\nworkers = 4\ntag = ["a", "b"]\n')
    args = parser.parse_args(["--config", str(config), "--tag", "c"])
    resolve(args, {"SHARDSTORE_DEMO_WORKERS": "2", "SHARDSTORE_DEMO_JSON": "1"})
    assert args.require_thing is True and args.workers == 2 and args.tag == ["a", "b", "c"] and args.json is False
    args = parser.parse_args([])
    resolve(args, {"SHARDSTORE_DEMO_REQUIRE_THING": "no"})
    assert args.require_thing is False and args.workers == 1 and args.tag == []
    with pytest.raises(InvalidInputError, match=r"\$SHARDSTORE_DEMO_WORKERS: '3' is not one of 1, 2, 4"):
        resolve(parser.parse_args([]), {"SHARDSTORE_DEMO_WORKERS": "3"})
    with pytest.raises(InvalidInputError, match=r"\$SHARDSTORE_DEMO_REQUIRE_THING: expected true or false"):
        resolve(parser.parse_args([]), {"SHARDSTORE_DEMO_REQUIRE_THING": "maybe"})


@pytest.mark.parametrize(("name", "text", "message"), [
    ("typo.toml", "cache_sise = 5\n", r"typo.toml: unknown setting 'cache_sise' \(known: .*cache_size"),
    ("bad.toml", "port = \n", r"bad.toml: .*"),
    ("bad.yaml", "port: [1, 2\n", r"bad.yaml: .*"),
    ("list.yaml", "- port\n", r"list.yaml: expected a table of settings, not list"),
    ("value.toml", 'cache_size = "lots"\n', r"value.toml: cache_size: not a size: 'lots'"),
    ("switch.toml", "port = true\n", r"switch.toml: port: expected a value, not true"),
    ("serve.ini", "port=1\n", r"serve.ini: name it .toml, .yaml or .yml"),
])
def test_bad_config_files_are_one_line_errors_naming_the_file(tmp_path: Path, name: str, text: str,
                                                               message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(InvalidInputError, match=message) as info:
        serve_args(["--config", str(tmp_path / name)], {})
    assert "\n" not in str(info.value)


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"config file .*nowhere.toml: No such file"):
        serve_args([], {"SHARDSTORE_SERVE_CONFIG": str(tmp_path / "nowhere.toml")})


def test_cli_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    env = {**os.environ, "SHARDSTORE_SERVE_PORT": "fifty"}
    result = subprocess.run([sys.executable, "-m", "shardstore", "serve", "--store", str(tmp_path / "s")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "shardstore serve: error: $SHARDSTORE_SERVE_PORT: not a port number: 'fifty'"]
    assert not (tmp_path / "s").exists()


def test_every_serve_setting_is_documented_with_its_three_names() -> None:
    args = build_parser().parse_args(["serve"])
    from shardstore.config import settings_of

    table = settings_of(args)
    assert table is not None and len(table.settings) >= 9
    docs = DOCS.read_text()
    for setting in table.settings:
        row = f"| `{setting.flag}`"
        assert row in docs, f"docs/operations.md lacks a row for {setting.flag}"
        line = next(line for line in docs.splitlines() if line.startswith(row))
        assert f"`{setting.env}`" in line and f"`{setting.key}`" in line, line
    assert f"`{table.config_env}`" in docs
