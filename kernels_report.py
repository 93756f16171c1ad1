"""
Compile kernels.py's autotune configs offline for a GPU that is not here (default: Hopper, sm_90a) and report,
per config, the registers, spilled bytes, stack and shared memory that ptxas gives. Needs no GPU and no driver:
triton.compile with a GPUTarget, and the ptxas shipped inside the triton wheel.

    python kernels_report.py                        # the default configs, bf16, head dim 128, 4 query heads per kv head
    python kernels_report.py --candidates           # also configs not in the default list, to choose from
    python kernels_report.py --dtype fp16 --head-dim 64 --group 1
    python kernels_report.py --config fwd:128,128,8,3 --config dq:64,64,4,3

Each compile specializes arguments as the launcher would for the benchmark's shapes (pointers 16-byte aligned;
T, W, H and every stride multiples of 16; GROUP = 1 a constant). Triton's version matters: the CUDA wheel of
torch 2.13 pins triton 3.7.1 (`pip install --target DIR triton==3.7.1` and PYTHONPATH=DIR to report for it).
Compiling takes 3-15 s a config on one CPU core. Exit code 1 if a default config spills registers or needs more
shared memory than one block may have (227 KB on Hopper), 2 if one fails to compile.
"""

import argparse
import contextlib
from dataclasses import dataclass
import io
import os
import re
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernels_report.py compiles for a GPU: unset TRITON_INTERPRET (the interpreter replaces compilation)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

import kernels  # noqa: E402

MAX_SHARED_BYTES = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 100: 227 * 1024}  # per block, opt-in maximum
TRITON_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}

# Configs worth knowing about beyond the default list: bigger tiles, deeper pipelines, and the ones the default
# list dropped for spilling with triton 3.7.1 (kept here so the report shows why).
CANDIDATES = {
    "fwd": [(128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 2), (64, 128, 4, 3)],
    "dkdv": [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 2), (16, 128, 8, 2)],
    "dq": [(128, 64, 8, 3), (64, 64, 4, 2), (128, 32, 4, 3), (64, 128, 8, 2)],
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability as one number: 90 is Hopper")
    parser.add_argument("--dtype", choices=sorted(TRITON_DTYPES), default="bf16", help="q, k, v dtype")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim D")
    parser.add_argument("--group", type=int, default=4, help="query heads per kv head (1: MHA, a constant)")
    parser.add_argument("--layout", choices=["bhtd", "bthd"], default="bhtd",
                        help="memory layout of q, k, v: contiguous (B, H, T, D) as the benchmark times, or the "
                             "model's (B, T, H, D) transposed; it sets the row strides, which are constants")
    parser.add_argument("--heads", type=int, default=32, help="query heads H (row strides of the bthd layout)")
    parser.add_argument("--kernels", nargs="+", default=["fwd", "dkdv", "dq"], choices=["fwd", "dkdv", "dq"])
    parser.add_argument("--candidates", action="store_true", help="also compile the candidate configs")
    parser.add_argument("--tma", action="store_true",
                        help="the kernels with tensor-descriptor loads (use_tma=True)")
    parser.add_argument("--config", action="append", default=[], metavar="KERNEL:BM,BN,WARPS,STAGES",
                        help="an extra config to compile, e.g. fwd:128,128,8,3 (repeatable)")
    args = parser.parse_args()
    extra = []
    for text in args.config:
        try:
            name, numbers = text.split(":")
            block_m, block_n, warps, stages = (int(x) for x in numbers.split(","))
        except ValueError:
            parser.error(f"--config {text!r} must look like fwd:128,64,8,3 (kernel:BLOCK_M,BLOCK_N,warps,stages)")
        if name not in kernels._KERNELS:
            parser.error(f"--config {text!r}: kernel must be one of {', '.join(kernels._KERNELS)}")
        extra.append((name, (block_m, block_n, warps, stages)))
    args.extra = extra
    return args


def row_strides(layout, head_dim, heads, group):
    """Row stride (elements between consecutive tokens) of each kernel tensor argument, as the kernels'
    constexpr stride_*t arguments would receive them."""
    q_rows, kv_rows = (head_dim, head_dim) if layout == "bhtd" else (heads * head_dim, heads // group * head_dim)
    return {"qt": q_rows, "ot": q_rows, "dot": q_rows, "dqt": q_rows, "kt": kv_rows, "vt": kv_rows,
            "dkt": kv_rows, "dvt": kv_rows}


def signature_and_constants(fn, dtype, head_dim, group, block_m, block_n, strides, use_tma):
    """The argument types and constants a GPU launch of `fn` would compile with, and the arguments that the
    launcher would mark divisible by 16 (16-byte aligned pointers; T, W, H and strides in the benchmark)."""
    signature, constants, divisible = {}, {}, []
    given = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, COUNT_VISITS=False, VISITS=None,
                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    given.update({f"stride_{name}": value for name, value in strides.items()}, USE_TMA=use_tma)
    for name in fn.arg_names:
        if name in given:
            signature[name], constants[name] = "constexpr", given[name]
        elif name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
            divisible.append(name)
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            signature[name] = f"*{TRITON_DTYPES[dtype]}"
            divisible.append(name)
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        elif name == "GROUP" and group == 1:  # the launcher turns an int argument equal to 1 into a constant
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if name != "GROUP" or group % 16 == 0:
                divisible.append(name)
    return signature, constants, divisible


@dataclass(frozen=True)
class Target:
    """What every config is compiled for: the GPU architecture and the attention's shape and dtype."""
    arch: int
    dtype: str
    head_dim: int
    heads: int
    group: int
    layout: str
    tma: bool


def compile_report(name, config, target: Target):
    """Compile one kernel config; return a dict of what ptxas and Triton report about it."""
    block_m, block_n, warps, stages = config
    fn = kernels._KERNELS[name]
    strides = row_strides(target.layout, target.head_dim, target.heads, target.group)
    signature, constants, divisible = signature_and_constants(fn, target.dtype, target.head_dim, target.group,
                                                              block_m, block_n, strides, target.tma)
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    gpu = GPUTarget("cuda", target.arch, 32)
    options = make_backend(gpu).parse_options({"num_warps": warps, "num_stages": stages})
    knobs.nvidia.dump_ptxas_log = True  # triton runs ptxas -v; this prints its log, captured below
    log = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=gpu, options=options.__dict__)
    text = log.getvalue()
    if "registers" not in text:  # a cached compile runs no ptxas: run it on the PTX for the numbers
        text = run_ptxas(compiled.asm["ptx"], target.arch)
    found = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else -1
    return dict(
        registers=found(r"Used (\d+) registers"), spill_stores=found(r"(\d+) bytes spill stores"),
        spill_loads=found(r"(\d+) bytes spill loads"), stack=found(r"(\d+) bytes stack frame"),
        shared=compiled.metadata.shared, wgmma=compiled.asm["ptx"].count("wgmma.mma_async"),
        bulk_loads=compiled.asm["ptx"].count("cp.async.bulk.tensor"),
        seconds=time.perf_counter() - started)


def run_ptxas(ptx, arch):
    import subprocess
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        result = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", path, "-o", path + ".o"],
                                capture_output=True, text=True, check=True)
    return result.stderr


def main():
    args = parse_args()
    # The configs a launch autotunes over: the default list less the tiles too big for this dtype and head dim.
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    max_tile = kernels._max_tile(torch_dtype, args.head_dim)
    plan = [(name, config, "default") for name in args.kernels for config in kernels._GPU_CONFIGS[name]
            if config[0] * config[1] <= max_tile]
    if args.candidates:
        plan += [(name, config, "candidate") for name in args.kernels for config in CANDIDATES[name]
                 if config not in kernels._GPU_CONFIGS[name]]
    plan += [(name, config, "extra") for name, config in args.extra]
    limit = MAX_SHARED_BYTES.get(args.arch, 227 * 1024)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, head dim {args.head_dim}, "
          f"group {args.group}, {args.layout} layout{', TMA loads' if args.tma else ''}: "
          f"{len(plan)} configs", flush=True)

    target = Target(args.arch, args.dtype, args.head_dim, args.heads, args.group, args.layout, args.tma)
    rows, worst = [], 0
    for name, config, kind in plan:
        try:
            report = compile_report(name, config, target)
        except Exception as error:  # report it and go on: one bad config should not hide the others
            message = f"{type(error).__name__}: {error}".replace("\n", " ")[:100]
            rows.append((name, config, kind, None, f"failed: {message}"))
            worst = max(worst, 2 if kind == "default" else 0)
            print(f"  {name} {config}: {message}", flush=True)
            continue
        spills = report["spill_stores"] + report["spill_loads"]
        verdict = "ok" if report["registers"] >= 0 else "NO PTXAS REPORT"  # never call unparsed output clean
        if spills > 0:
            verdict = "SPILLS"
        if report["shared"] > limit:
            verdict = "SHARED MEMORY OVER LIMIT"
        if verdict != "ok" and kind == "default":
            worst = max(worst, 1)
        rows.append((name, config, kind, report, verdict))
        print(f"  {name} {config}: {report['registers']} registers, {spills} B spilled, "
              f"{report['shared'] // 1024} KB shared, {report['seconds']:.1f} s", flush=True)

    print(f"\n{'kernel':<6} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6} {'list':<9} {'regs':>4} "
          f"{'spill st/ld B':>13} {'stack B':>7} {'shared KB':>9} {'wgmma':>5} {'TMA':>3}  verdict")
    for name, (block_m, block_n, warps, stages), kind, report, verdict in rows:
        if report is None:
            print(f"{name:<6} {block_m:>4} {block_n:>4} {warps:>5} {stages:>6} {kind:<9} {verdict}")
            continue
        spill = f"{report['spill_stores']}/{report['spill_loads']}"
        print(f"{name:<6} {block_m:>4} {block_n:>4} {warps:>5} {stages:>6} {kind:<9} {report['registers']:>4} "
              f"{spill:>13} {report['stack']:>7} {report['shared'] / 1024:>9.1f} {report['wgmma']:>5} "
              f"{report['bulk_loads']:>3}  {verdict}")
    print(f"shared memory limit per block {limit // 1024} KB; wgmma: Hopper tensor-core instructions in the PTX; "
          f"TMA: bulk tensor loads (cp.async.bulk.tensor) in the PTX")
    sys.exit(worst)


if __name__ == "__main__":
    main()
