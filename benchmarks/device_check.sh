#!/usr/bin/env bash
# Run the GPU checks on the device machine (the `run` tool), from the repository root: the
# gpu-marked tests (kernels compiled for the GPU: DELTAHUB_KERNELS_GPU=1 turns the interpreter
# off; engine in bf16) and the obs column-kernel tests, which move their tensors to CUDA.
#   bash benchmarks/device_check.sh [pytest args...]      e.g.  -k "slot_layout or asm_decode"
# with carry ["benchmarks/quality/data/carry1/wheels"] (the zstandard wheel; the image lacks it).
# Pitfalls this avoids (both cost device time before): `pip install --target` into a folder left
# by an earlier call on a warm machine silently keeps the old copy, so install into a fresh one;
# and pytest run from the source tree imports ./deltahub (which has no deltahub.kernels /
# deltahub.server: they exist only through the package mapping), so run a copy of tests/ elsewhere.
set -euo pipefail
ROOT=$(pwd)
SITE=$(mktemp -d /tmp/deltahub-site.XXXXXX)
WHEELS=$(ls benchmarks/quality/data/carry1/wheels/zstandard*.whl 2>/dev/null || true)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . $WHEELS
TESTS=$(mktemp -d /tmp/deltahub-tests.XXXXXX)
cp -r "$ROOT/tests" "$TESTS/"
cd "$TESTS"
export DELTAHUB_KERNELS_GPU=1 PYTHONPATH="$SITE"
python3 -m pytest -p no:cacheprovider -q -o addopts="" --timeout=300 -m gpu tests "$@"
python3 -m pytest -p no:cacheprovider -q -o addopts="" --timeout=300 tests/kernels/test_obs_block.py "$@"
