"""torch is an extra: push, pull, ls, inspect, verify, gc and serve run without it; open/load say so in one line.

Two checks. A fast one: every command in a process where ``import torch`` fails.
A real one: a fresh virtualenv holding exactly the dependency closure
pyproject.toml declares (linked from this environment's installed
distributions, so it runs offline) and shardstore installed into it by
``pip install --no-deps``, with its console script; torch is not there at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from rpc.grpc_helpers import write_small_model

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI with torch unimportable, as if it were not installed.
BLOCKED = ("import sys; sys.modules['torch'] = None; from shardstore.cli import main; "
           "sys.exit(main(sys.argv[1:]))")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(python: list[str], args: list[str], env: dict[str, str],
         check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*python, *args], capture_output=True, text=True, env=env, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"{args}: exit {done.returncode}\n{done.stderr}")
    return done


def _exercise(python: list[str], env: dict[str, str], tmp: Path) -> None:
    """push, ls, inspect, verify, gc, serve and pull over gRPC, then the one-line torch errors."""
    model = write_small_model(tmp / "model")
    store = str(tmp / "store")
    _run(python, ["push", str(model), "small:v1", "--store", store, "--quiet"], env)
    listed = json.loads(_run(python, ["ls", "--store", store, "--json"], env).stdout)
    assert [m["ref"] for m in listed["models"]] == ["small:v1"]
    inspected = json.loads(_run(python, ["inspect", "small:v1", "--store", store, "--json"], env).stdout)
    assert set(inspected["tensors"]) == {"head.bias", *(f"layers.{i}.weight" for i in range(4))}
    _run(python, ["verify", "--read-data", "--store", store, "--quiet"], env)
    _run(python, ["gc", "--store", store, "--grace", "0", "--quiet"], env)
    port = _free_port()
    server = subprocess.Popen([*python, "serve", "--store", store, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _attempt in range(120):  # until the server listens (it imports and binds in its own time)
            if _run(python, ["health", f"grpc://127.0.0.1:{port}", "--quiet"], env, check=False).returncode == 0:
                break
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            time.sleep(0.25)
        out = tmp / "pulled"
        _run(python, ["pull", f"grpc://127.0.0.1:{port}/small:v1", str(out), "--quiet", "--cache", str(tmp / "c")],
             env)
        for name in ("model.safetensors", "config.json"):
            assert (out / name).read_bytes() == (model / name).read_bytes(), name
        loaded = _run(python, ["load", f"grpc://127.0.0.1:{port}/small:v1"], env, check=False)
        assert loaded.returncode == 1 and loaded.stdout == ""
        assert loaded.stderr == "shardstore load: error: shardstore load needs torch: pip install 'shardstore[torch]'\n"
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "Traceback" not in (server.stderr.read() if server.stderr else "")


def test_every_torch_free_command_runs_with_torch_unimportable(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    _exercise([sys.executable, "-c", BLOCKED], env, tmp_path)
    code = ("import sys; sys.modules['torch'] = None; import shardstore\n"
            "try:\n    shardstore.open('small:v1', store=sys.argv[1])\n"
            "except shardstore.ShardstoreError as exc:\n    print(exc)\n")
    said = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    assert said.stdout == "shardstore.open needs torch: pip install 'shardstore[torch]'\n"


def test_only_the_load_package_imports_torch() -> None:
    """Every module but ``shardstore.load`` (the lazy view and loaders) imports with torch unimportable."""
    code = ("import importlib, pkgutil, sys; sys.modules['torch'] = None; import shardstore\n"
            "for m in pkgutil.walk_packages(shardstore.__path__, 'shardstore.'):\n"
            "    if m.name.startswith('shardstore.load') or m.name.endswith('__main__'):\n        continue\n"
            "    importlib.import_module(m.name)\n    print(m.name)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    imported = set(done.stdout.split())
    assert {"shardstore.api", "shardstore.cli.models", "shardstore.rpc.server", "shardstore.repo.snapshot",
            "shardstore.http.app"} <= imported


def _closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions ``requirements`` need, transitively (extras of the root excluded)."""
    found: dict[str, metadata.Distribution] = {}
    pending = [Requirement(text) for text in requirements]
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if key in found:
            continue
        dist = metadata.distribution(requirement.name)
        found[key] = dist
        for extra in requirement.extras:  # s3fs[boto3]-style extras of a dependency count
            pending += [Requirement(r) for r in dist.requires or [] if f'extra == "{extra}"' in r]
        pending += [Requirement(r) for r in dist.requires or []]
    return found


def _link_distribution(dist: metadata.Distribution, site: Path) -> None:
    """Symlink a distribution's top-level files and folders (and its .dist-info) into ``site``."""
    base = Path(str(dist.locate_file("")))
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops:
        source, target = base / top, site / top
        if source.exists() and not target.exists() and top != "__pycache__":
            target.symlink_to(source)


def test_a_fresh_virtualenv_without_torch_pushes_pulls_and_serves(tmp_path: Path) -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(Requirement(r).name == "torch" for r in declared)
    closure = _closure(declared)
    assert "torch" not in closure  # nothing shardstore depends on brings torch either

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The runtime dependencies, and setuptools to build with (offline: from this environment).
    for dist in [*closure.values(), metadata.distribution("setuptools")]:
        _link_distribution(dist, site)
    # pip install of shardstore itself, from the files the Dockerfile builds from (no build outputs).
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "shardstore", source / "shardstore",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--no-build-isolation", "--quiet", "--disable-pip-version-check", str(source)],
                   check=True, timeout=300, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    found = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True, env=env, check=True)
    assert found.stdout.strip() == "None"  # really no torch in this environment
    _exercise([str(venv / "bin" / "shardstore")], env, tmp_path)  # the installed console script
    said = subprocess.run([str(python), "-c", "import shardstore; print(shardstore.__file__); "
                           "shardstore.open('small:v1', store='x')"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    last = said.stderr.strip().splitlines()[-1]
    assert said.returncode == 1 and last.endswith("shardstore.open needs torch: pip install 'shardstore[torch]'")
    assert said.stdout.startswith(str(site))  # the installed package, not this checkout
    shutil.rmtree(venv)
