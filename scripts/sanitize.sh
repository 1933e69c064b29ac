#!/usr/bin/env bash
# The C codec kernels (_entropy.c, _quantize.c) built with AddressSanitizer and UndefinedBehaviorSanitizer,
# then the codec fuzz tests run against that build over every codec id. An out-of-bounds read or write,
# or undefined behaviour, aborts the run even where the decoded bytes happen to look right.
#
# The build goes to a temporary copy of the package: the tree's own (optimised) build is left alone.
# Called by scripts/test.sh; takes a few minutes (SHARDSTORE_FUZZ_EXAMPLES, default 300, per property).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cp -r shardstore "$work/"
find "$work/shardstore" -name '*.so' -delete
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
    "$python" setup.py -q build_ext --build-lib "$work" --build-temp "$work/build" >/dev/null 2>&1
# The extensions are optional in setup.py (a machine without a compiler falls back to numpy): here a
# failed build must fail, or the fuzz tests would quietly run the numpy fallback.
for module in _entropy _quantize; do
    ls "$work"/shardstore/codecs/"$module".*.so >/dev/null
done

export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH="$work"
"$python" -P - "$work" <<'PY'
import sys
import shardstore.codecs._entropy as entropy
import shardstore.codecs._quantize as quantize
for module in (entropy, quantize):
    assert module.__file__.startswith(sys.argv[1]), f"{module.__name__} is not the sanitized build: {module.__file__}"
PY
# -P: the checkout itself must not come first on sys.path (it holds the unsanitized build).
"$python" -P -m pytest -q -p no:cacheprovider tests/codecs/test_codec_fuzz.py tests/codecs/test_entropy.py
