#!/usr/bin/env bash
# Profile SBMM cases with ncu on the device machine (the `run` tool), from the repository root,
# with carry ["benchmarks/quality/data/carry1/wheels"]:
#   bash benchmarks/ncu_sbmm.sh [CASE ...]
# CASE: bench_sbmm.py --one's BITS,K,N_out,B,ND[,block_m,warps,split,depth,stream,maxnreg,stages,xdirect]
# (maxnreg 0 = no cap). Default: 4096^2 4-bit at N = 16 (register pipeline, then shared-memory
# ring) and at N = 32. Prints the lines that matter (duration, DRAM, stalls, occupancy, limits);
# the whole reports land in $OUT/ncu_<i>.txt. Only the SBMM kernel is profiled (the permute of
# x and the benchmark's set-up kernels are skipped by name), its 3rd launch.
set -uo pipefail
SITE=$(mktemp -d /tmp/deltahub-site.XXXXXX)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . \
    benchmarks/quality/data/carry1/wheels/zstandard*.whl
export PYTHONPATH=$SITE
M=dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum
M=$M,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum
M=$M,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum
M=$M,l1tex__t_sectors_pipe_lsu_mem_global_op_ld_lookup_hit.sum,smsp__inst_executed.sum
M=$M,smsp__average_warp_latency_per_inst_issued.ratio
S=(--section SpeedOfLight --section MemoryWorkloadAnalysis_Tables --section WarpStateStats
   --section SchedulerStats --section Occupancy --section LaunchStats)
KEEP="duration|dram|Warp Cycles Per Issued|stalled|Achieved Occupancy|Issued Warp|No Eligible"
KEEP="$KEEP|Active Warps Per|Eligible Warps|Registers|Shared Memory Config|Waves|Block Limit"
KEEP="$KEEP|lts__t_sectors|l1tex__t|inst_executed|warp_latency"
CASES=("$@")
[ ${#CASES[@]} -eq 0 ] && CASES=("4,4096,4096,32,16,8,4,1,4" "4,4096,4096,32,16,8,4,1,2,0,0,8" "4,4096,4096,32,32,8,4,1,4")
i=0
for C in "${CASES[@]}"; do
    i=$((i + 1))
    echo "=== $C"
    ncu --clock-control none -k regex:_sbmm24 --launch-skip 2 --launch-count 1 "${S[@]}" --metrics "$M" \
        python3 benchmarks/bench_sbmm.py --one "$C" > "$OUT/ncu_$i.txt" 2>&1
    grep -v "^==PROF==" "$OUT/ncu_$i.txt" | grep -E -i "$KEEP" | head -40
done
