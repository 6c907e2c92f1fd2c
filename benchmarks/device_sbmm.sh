#!/usr/bin/env bash
# The SBMM device call (the `run` tool, repository root, carry ["benchmarks/quality/data/carry1/wheels"]):
#   bash benchmarks/device_sbmm.sh [BENCH_ARGS...] [-- NCU_CASE...]
# e.g. `bash benchmarks/device_sbmm.sh --quick --sweep -- 4,4096,4096,32,16,8,4,4,2,0,0,3`.
# 1. Launches every trial config (4- and 2-bit) in a process of their own (`bench_sbmm.py --one`):
#    if one faults (a sticky CUDA error kills the process), the benchmark runs without them.
# 2. The benchmark (`--no-sgmv --merge docs/benchmarks/sbmm.json` + BENCH_ARGS) -> $OUT.
# 3. ncu on each NCU_CASE (benchmarks/ncu_sbmm.sh).
# 4. The GPU tests last (benchmarks/device_check.sh; CHECK_K: their -k filter), so a fault there
#    costs no measurement.
# Every output lands whole under $OUT (a `tail` of a failure cuts its message off).
set -uo pipefail
BENCH=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do BENCH+=("$1"); shift; done
[ $# -gt 0 ] && shift
SITE=$(mktemp -d /tmp/deltahub-site.XXXXXX)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . \
    benchmarks/quality/data/carry1/wheels/zstandard*.whl
trials=$(cd /tmp && PYTHONPATH=$SITE python3 -c "
from deltahub.kernels import sbmm24
print(' '.join(','.join(str(int(v or 0)) for v in c) for c in sbmm24.TRIAL_CONFIGS))")
cases=$(for c in $trials; do echo "4,4096,4096,32,16,$c 2,4096,4096,32,16,$c"; done)
if [ -n "$cases" ] && ! PYTHONPATH=$SITE timeout 240 python3 benchmarks/bench_sbmm.py --one $cases \
    > "$OUT/trials.txt" 2>&1; then
    echo "a trial config faults (trials.txt): benchmark without trial configs"
    BENCH+=(--no-trial)
fi
PYTHONPATH=$SITE timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/bench_sbmm.py --no-sgmv --merge docs/benchmarks/sbmm.json \
    --out "$OUT" "${BENCH[@]}" > "$OUT/sbmm_log.txt" 2>&1
echo "benchmark rc $?"; grep -E "^ceilings|fails|Error" "$OUT/sbmm_log.txt" | head -20
[ $# -gt 0 ] && timeout 200 bash benchmarks/ncu_sbmm.sh "$@" > "$OUT/ncu_summary.txt" 2>&1
timeout 240 bash benchmarks/device_check.sh -k "${CHECK_K:-asm_decode or slot_layout}" --tb=short > "$OUT/check.txt" 2>&1
echo "tests rc $?"; tail -3 "$OUT/check.txt"
