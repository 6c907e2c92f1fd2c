"""Static cost of SBMM launch configs, without a GPU: compile for sm_90, count SASS in the K loop.

Usage: python benchmarks/sass_sbmm.py "4,1,3,16,128,1024,8,2" "4,1,0,16,64,128,4,4" ...
       (bits, sparse 0/1, mode, block_m, block_n, block_k, num_warps, num_stages: kernels/sbmm.py)
       python benchmarks/sass_sbmm.py "slot:4,16,4,2" ...
       (bits, block_m, num_warps, depth[, fp16 0/1[, stream 0/1[, stages[, xdirect 0/1[, mixed 0/1]]]]]:
       kernels/sbmm24.py; stages > 0: the shared-memory ring, whose loop is one step)

Compiles ``_sbmm_kernel`` with triton's own ptxas for an H100/H200 target, disassembles it with the
nvdisasm that ships with triton, finds the longest backward branch (the K loop) and prints its
instruction count per stored value per thread, the top opcodes, and the number of layout
conversions in the TTGIR (each one a round trip through shared memory unless trivial).
Specialisations mimic a real call: unit K and N strides, K and N multiples of the blocks (EVEN).
See benchmarks/NOTES-sbmm.md.
"""

from __future__ import annotations

import collections
import inspect
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from deltahub.kernels.sbmm import _sbmm_kernel, _unit_values
from deltahub.kernels.sbmm24 import _sbmm24_kernel
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTERS = {
    "x_ptr": "*bf16",
    "qw_ptr": "*i32",
    "qh_ptr": "*i32",
    "meta_ptr": "*i32",
    "sc_ptr": "*fp32",
    "out_ptr": "*bf16",
    "order_ptr": "*i32",
    "seg_ptr": "*i32",
}


def compile_config(bits, sparse, mode, bm, bn, bk, warps, stages):
    if mode == 3:
        bk = max(bk, 16 * (2 if sparse else 1) * _unit_values(bits, sparse))
    const = dict(
        BITS=bits,
        SPARSE=sparse,
        GROUP=0,
        ZP=(2**bits - 1) / 2,
        S_P2=64,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        MODE=mode,
        IEEE=False,
        SCALE_IN=False,
        PER_TILE=False,
        GATHER=mode == 2 and sparse,
        BIASED=not (mode == 2 and sparse),
        EVEN=True,
        s_xk=1,
        s_on=1,
    )
    names = list(inspect.signature(_sbmm_kernel.fn).parameters)
    sig = {n: "constexpr" if n in const else POINTERS.get(n, "i32") for n in names}
    src = ASTSource(_sbmm_kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages)
    )


def compile_slot_config(
    bits, bm, warps, depth=2, f16=False, stream=False, stages=0, xdirect=False, mixed=False
):
    """kernels/sbmm24.py (mma.sp on the slot layout), per-row scales; one task per program or the
    stream-K grid."""
    const = dict(
        BITS=bits, GROUP=0, S_P2=64, BLOCK_M=bm, WARPS=warps, F16=bool(f16), SPLIT=1, DEPTH=depth,
        STAGES=stages, STREAM=bool(stream), PAIRS=True, XDIRECT=bool(xdirect), MIXED=bool(mixed), s_on=1,
    )  # fmt: skip
    xt = "*fp16" if f16 else "*bf16"
    ptrs = {"x_ptr": "*i32", "dw_ptr": "*i32", "sc_ptr": "*fp32", "out_ptr": xt}
    ptrs.update(order_ptr="*i32", seg_ptr="*i32")
    names = list(inspect.signature(_sbmm24_kernel.fn).parameters)
    sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in names}
    # what a real call's specialisation knows: 16-aligned pointers, strides and sizes
    div = [*ptrs, "s_xt", "s_ds", "s_ss", "s_ot", "N"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div}
    consts = {(names.index(k),): v for k, v in const.items()}
    src = ASTSource(_sbmm24_kernel, sig, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=warps, num_stages=max(1, stages))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def resources(cubin: bytes) -> str:
    """Registers, stack and spill bytes of the kernel (cuobjdump -res-usage)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return f"regs {m.group(1)}, stack {m.group(2)}" if m else "regs ?"


def loop_instructions(cubin: bytes) -> list[str]:
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True
        ).stdout
    labels, ops = {}, []
    for line in text.splitlines():
        if m := re.match(r"\s*\.(L_x_\d+):", line):
            labels[m.group(1)] = len(ops)
        elif m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*)", line):
            ops.append((m.group(1).split(".")[0], m.group(2)))
    loops = []  # backward branches: (first, last) instruction
    for i, (op, rest) in enumerate(ops):
        target = re.search(r"(L_x_\d+)", rest) if op == "BRA" else None
        if target and labels.get(target.group(1), i) < i:
            loops.append((labels[target.group(1)], i))
    # the K loop: the longest loop with no loop inside it (the stream-K grid wraps it in another)
    inner = [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]
    best = max(inner, key=lambda a: a[1] - a[0], default=(0, 0))
    return [op for op, _ in ops[best[0] : best[1] + 1]]


def main(argv: list[str]) -> int:
    for spec in argv or ["slot:4,16,4,2", "slot:2,16,4,2", "4,1,0,16,64,128,4,4"]:
        if spec.startswith("slot:"):
            vals = ([int(v) for v in spec[5:].split(",")] + [0] * 5)[:9]
            k = compile_slot_config(*vals)
            bits, bm, warps, depth, _, _, stages = vals[:7]
            body = loop_instructions(k.asm["cubin"])
            # one K step = 64 inputs, 32 stored values per row, 64 rows per warp; depth 3 / 4: 2 / 3 steps
            stored = warps * 64 * 32 * (1 if stages else {3: 2, 4: 3}.get(depth, 1))
            top = collections.Counter(body).most_common(12)
            print(
                f"{spec}: {len(body)} instr/loop, {len(body) * warps * 32 / stored:.2f} per stored value, "
                f"smem {k.metadata.shared} B, {resources(k.asm['cubin'])}, "
                f"{k.asm['ttgir'].count('ttg.convert_layout')} layout conversions; {top}"
            )
            continue
        bits, sparse, mode, bm, bn, bk, warps, stages = (int(v) for v in spec.split(","))
        k = compile_config(bits, bool(sparse), mode, bm, bn, bk, warps, stages)
        body = loop_instructions(k.asm["cubin"])
        bk_eff = max(bk, 16 * (2 if sparse else 1) * _unit_values(bits, bool(sparse))) if mode == 3 else bk
        stored = bn * bk_eff // (2 if sparse else 1)
        cvt = k.asm["ttgir"].count("ttg.convert_layout")
        top = collections.Counter(body).most_common(8)
        print(
            f"{spec}: {len(body)} instr/loop, {len(body) * warps * 32 / stored:.1f} per stored value, "
            f"smem {k.metadata.shared} B, {cvt} layout conversions; {top}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
