"""Failures users meet on day one end in one line on stderr, a non-zero exit and no traceback, quickly.

Real processes: the CLI as a child, a real listener holding a port, moto's real S3 server, a closed port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rpc.grpc_helpers import write_small_model

# Everything the S3 client could read credentials or an endpoint from, so each case controls its own.
_AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
# A bound, not a benchmark: botocore's default retries took 27 s on a refused connection.
FAST_S = 15.0


def run(*args: str | Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "shardstore", *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=120)
    return result, time.monotonic() - started


def one_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shardstore {command}: error: "), result.stderr
    return lines[0]


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port something else is listening on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def aws_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _AWS_KEYS}
    # No credentials files and no instance metadata: what is set below is all the client has.
    env |= {"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}
    return env | values


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--http-port"])
def test_serve_on_a_busy_port(flag: str, held_port: int, tmp_path: Path) -> None:
    ports = {"--port": "0", flag: str(held_port)}
    args = [item for pair in ports.items() for item in pair]
    result, _seconds = run("serve", "--store", tmp_path / "store", *args, env=dict(os.environ))
    line = one_line(result, "serve")
    assert f"127.0.0.1:{held_port}" in line and "in use" in line, line


def test_s3_without_credentials(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    env = aws_env(AWS_ENDPOINT_URL=s3_endpoint)
    model = write_small_model(tmp_path / "model")
    for command in (("ls", "--store", f"s3://{s3_bucket}/m"), ("push", model, "m:v1", "--store", f"s3://{s3_bucket}/m")):
        result, seconds = run(*command, env=env)
        line = one_line(result, str(command[0]))
        assert "no S3 credentials found" in line and "AWS_ACCESS_KEY_ID" in line, line
        assert seconds < FAST_S


def test_s3_with_a_wrong_endpoint(closed_port: int, tmp_path: Path) -> None:
    env = aws_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed_port}")
    for command in (("ls", "--store", "s3://models/m"), ("pull", "m:v1", tmp_path / "out", "--store", "s3://models/m")):
        result, seconds = run(*command, env=env)
        line = one_line(result, str(command[0]))
        assert "cannot reach the S3 endpoint" in line and f"127.0.0.1:{closed_port}" in line, line
        assert "no endpoint is set" not in line
        assert seconds < FAST_S


def test_s3_without_an_endpoint_names_the_setting(closed_port: int) -> None:
    # No endpoint: the client goes to AWS. The proxy, a closed local port, keeps the test off the internet.
    env = aws_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  HTTPS_PROXY=f"http://127.0.0.1:{closed_port}", HTTP_PROXY=f"http://127.0.0.1:{closed_port}")
    result, seconds = run("ls", "--store", "s3://models/m", env=env)
    line = one_line(result, "ls")
    assert "cannot reach the S3 endpoint" in line and "set AWS_ENDPOINT_URL or -o endpoint_url=" in line, line
    assert seconds < FAST_S


def test_s3_that_answers_works_after_the_first_contact_tag_and_rm_included(s3_endpoint: str, s3_bucket: str,
                                                             tmp_path: Path) -> None:
    env = aws_env(AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    model = write_small_model(tmp_path / "model")
    pushed, _seconds = run("push", model, "m:v1", "--store", f"s3://{s3_bucket}/m", "--quiet", env=env)
    assert pushed.returncode == 0, pushed.stderr
    pulled, _seconds = run("pull", "m:v1", tmp_path / "out", "--store", f"s3://{s3_bucket}/m", "--quiet", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    # tag and rm on S3 too: refs move and go through the same Repository API as on a folder.
    store = ["--store", f"s3://{s3_bucket}/m"]
    assert run("tag", "m:v1", "m:v2", *store, env=env)[0].returncode == 0
    assert run("rm", "m:v1", *store, env=env)[0].returncode == 0
    listed, _seconds = run("ls", *store, "--json", env=env)
    assert [m["ref"] for m in json.loads(listed.stdout)["models"]] == ["m:v2"]
    gone = one_line(run("pull", "m:v1", tmp_path / "gone", *store, env=env)[0], "pull")
    assert gone.endswith("tags of 'm': v2"), gone


# -- numbers out of range, files that are not text, settings that are not settings -------------------------------


def usage_error(result: subprocess.CompletedProcess[str], command: str) -> str:
    """argparse's refusal: exit 2, the usage, then one error line naming the option."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"shardstore {command}: error: argument "), result.stderr
    return last


@pytest.mark.parametrize(("args", "expected"), [
    (("serve", "--port", "65536"), "--port: a port is 0 to 65535, not 65536"),
    (("serve", "--port", "0", "--metrics-port", "99999"), "--metrics-port: a port is 0 to 65535, not 99999"),
    (("serve", "--port", "0", "--http-port", "-1"), "--http-port: a port is 0 to 65535, not -1"),
    (("serve", "--port", "0", "--grace", "nan"), "--grace: not a finite number of seconds: 'nan'"),
    (("gc", "--grace", "nan"), "--grace: not a finite number of seconds: 'nan'"),
    (("gc", "--grace", "inf"), "--grace: not a finite number of seconds: 'inf'"),
    (("ls", "--store", "grpc://127.0.0.1:1", "--timeout", "0"), "--timeout: must be more than 0 seconds: '0'"),
    (("ls", "--store", "grpc://127.0.0.1:1", "--timeout", "-1"), "--timeout: must not be negative: '-1'"),
    (("health", "127.0.0.1:1", "--timeout", "nan"), "--timeout: not a finite number of seconds: 'nan'"),
])
def test_numbers_out_of_range_are_usage_errors(args: tuple[str, ...], expected: str, tmp_path: Path) -> None:
    store = ["--store", str(tmp_path / "store")] if args[0] in ("serve", "gc") else []
    result, _seconds = run(*args, *store, env=dict(os.environ))
    assert usage_error(result, args[0]).endswith(expected)


def test_gc_with_a_grace_of_nan_deletes_nothing(tmp_path: Path) -> None:
    # NaN compares false with every age: it would have counted nothing as young and deleted it all.
    model = write_small_model(tmp_path / "model")
    store = tmp_path / "store"
    env = dict(os.environ)
    assert run("push", model, "m:v1", "--store", store, "-q", env=env)[0].returncode == 0
    assert run("rm", "m:v1", "--store", store, "-q", env=env)[0].returncode == 0
    before = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    usage_error(run("gc", "--grace", "nan", "--store", store, env=env)[0], "gc")
    assert sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file()) == before
    from shardstore.errors import InvalidInputError
    from shardstore.repo.gc import collect
    from shardstore.repo.repository import Repository
    from shardstore.store import LocalStore

    with pytest.raises(InvalidInputError, match="grace period must be 0 or more seconds, not nan"):
        collect(Repository(LocalStore(store)), grace=float("nan"))
    assert sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file()) == before


@pytest.mark.parametrize("address", ["127.0.0.1:70000", "grpc://127.0.0.1:65536", "127.0.0.1:-5", "127.0.0.1"])
def test_health_refuses_a_port_no_server_can_have(address: str, held_port: int) -> None:
    # gRPC wraps 65536 and above round to a real port: a mistyped probe must not find some other server.
    line = one_line(run("health", address, env=dict(os.environ))[0], "health")
    assert "expected HOST:PORT (a port of 1 to 65535)" in line and address in line, line


def test_a_port_out_of_range_in_the_config_file_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text("port = 99999\n")
    line = one_line(run("serve", "--config", config, "--store", tmp_path / "store", env=dict(os.environ))[0], "serve")
    assert line.endswith(f"{config}: port: a port is 0 to 65535, not 99999"), line


def test_files_that_are_not_utf8_are_named(tmp_path: Path) -> None:
    model = write_small_model(tmp_path / "model")
    env = dict(os.environ)
    cases = {"serve": ("config file", "serve.toml", ("--config", "{path}", "--store", str(tmp_path / "store"))),
             "push": ("policy file", "policy.json", (str(model), "m:v1", "--store", str(tmp_path / "store"),
                                                     "--policy", "{path}")),
             "eval": ("", "sentences.txt", ("m:v1", "--store", str(tmp_path / "store"), "--sentences", "{path}"))}
    for command, (what, name, args) in cases.items():
        path = tmp_path / name
        path.write_bytes(b"\xff\xfeport = 1\n")
        line = one_line(run(command, *(a.format(path=path) for a in args), env=env)[0], command)
        assert line.endswith(f"{what + ' ' if what else ''}{path}: not UTF-8 text (byte 0 is 0xff)"), line


def test_s3_settings_that_are_not_settings(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    env = aws_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    store = f"s3://{s3_bucket}/m"
    bare_endpoint = s3_endpoint.removeprefix("http://")
    cases = [(("ls", "--store", store, "-o", f"endpoint_url={bare_endpoint}"), f"Invalid endpoint: {bare_endpoint}"),
             (("ls", "--store", store, "-o", f"endpoint={s3_endpoint}"), "unexpected keyword argument 'endpoint'"),
             (("push", write_small_model(tmp_path / "model"), "m:v1", "--store", store,
               "-o", f"endpoint={s3_endpoint}"), "unexpected keyword argument 'endpoint'")]
    for args, reason in cases:
        result, seconds = run(*args, env=env)
        line = one_line(result, str(args[0]))
        assert f"{store}: bad S3 settings (the -o storage options or the AWS_* environment): " in line, line
        assert reason in line, line
        assert seconds < FAST_S


def test_serve_on_s3_says_why_it_cannot_start(s3_endpoint: str, s3_bucket: str, closed_port: int) -> None:
    """A missing bucket is named as such; an unreachable endpoint or a bad option is not called a missing bucket."""
    env = aws_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    cases = [((f"s3://{s3_bucket}-gone/m", "-o", f"endpoint_url={s3_endpoint}"), "does not exist (create the bucket"),
             ((f"s3://{s3_bucket}/m", "-o", f"endpoint_url=http://127.0.0.1:{closed_port}"),
              "cannot reach the S3 endpoint"),
             ((f"s3://{s3_bucket}/m", "-o", f"endpoint={s3_endpoint}"), "bad S3 settings")]
    for (store, *options), expected in cases:
        result, seconds = run("serve", "--port", "0", "--store", store, *options, env=env)
        line = one_line(result, "serve")
        assert expected in line, line
        assert seconds < FAST_S


def test_rm_with_one_missing_ref_removes_none(tmp_path: Path) -> None:
    model = write_small_model(tmp_path / "model")
    store = ["--store", str(tmp_path / "store")]
    env = dict(os.environ)
    assert run("push", model, "m:v1", *store, "-q", env=env)[0].returncode == 0
    assert run("tag", "m:v1", "m:v2", *store, "-q", env=env)[0].returncode == 0
    line = one_line(run("rm", "m:v2", "m:typo", *store, "--json", env=env)[0], "rm")
    assert "m:typo" in line, line
    listed = json.loads(run("ls", *store, "--json", env=env)[0].stdout)
    assert sorted(m["ref"] for m in listed["models"]) == ["m:v1", "m:v2"]
    removed = run("rm", "m:v2", "m:v2", *store, "--json", env=env)[0]
    assert removed.returncode == 0, removed.stderr
    assert [r["ref"] for r in json.loads(removed.stdout)["removed"]] == ["m:v2"]


def test_eval_with_a_folder_that_is_not_a_sentence_model(tmp_path: Path) -> None:
    model = write_small_model(tmp_path / "model")
    (model / "config.json").write_text("{}")
    store = ["--store", str(tmp_path / "store")]
    env = dict(os.environ)
    assert run("push", model / "model.safetensors", "m:v1", *store, "-q", env=env)[0].returncode == 0
    line = one_line(run("eval", "m:v1", *store, "--model-dir", model, env=env)[0], "eval")
    assert line.startswith(f"shardstore eval: error: {model}: not a sentence model that loads offline: "), line
