"""Ahead-of-time compile of every Triton kernel configuration for sm_80 and sm_90, without a GPU.

Each configuration (kernel x input dtype, with the tile shapes of ``tile_configs``) goes through
the full Triton pipeline to PTX and a cubin for the target architecture. The report gives, per
configuration: registers per thread and spill bytes (the ``ptxas -v`` log of Triton's own ptxas
run, so each Triton release is measured with the ptxas and flags it uses itself), shared memory
per block (Triton's launch metadata), the resident blocks per SM those allow, which tensor-core
instructions the PTX and SASS use (``wgmma`` / ``HGMMA`` on sm_90, ``mma.sync`` / ``HMMA`` on
sm_80), and two static SASS checks (``sass_check``, on ``cuobjdump -sass`` from the triton wheel):
local-memory instructions (spills) and wgmma register-operand hazards around loops.

    python -m altpo_kernels.triton.aot_compile            # table for sm_80 and sm_90
    python -m altpo_kernels.triton.aot_compile --json     # the rows as JSON

``compile_report()`` returns the rows as a list of dicts; ``format_table(rows)`` prints them.
Under ``TRITON_INTERPRET=1`` the kernels in this process are interpreter objects that cannot be
compiled, so ``compile_report()`` then runs itself in a child process without that variable.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import sass_check
from .logprobs_backward import _grad_logits_kernel
from .logprobs_forward import _logprobs_forward_kernel, _lse_combine_kernel
from .segment_ops import _gather_segments_kernel, _segment_sum_kernel
from .tile_configs import (
    MAX_REGISTERS_PER_THREAD,
    REGISTERS_PER_SM,
    SHARED_MEMORY_LIMIT,
    TILES,
)

ARCHS = {"sm_80": 80, "sm_90": 90}
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
# Resident threads per SM on A100 and H100 (2048 both), for the occupancy column.
THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32


@dataclass
class KernelConfig:
    """One compilable variant: a kernel, its argument types, constexprs and launch options."""

    name: str
    kernel: object
    types: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    # Arguments the JIT would mark 16-divisible in production (pointers from the caching
    # allocator; hidden sizes and vocabulary split lengths that are multiples of 16).
    divisible: tuple = field(default_factory=tuple)
    # Register cap per thread handed to ptxas (None: ptxas decides, up to 255).
    maxnreg: int | None = None


def _dot_precision(dtype: str) -> str:
    return "tf32x3" if dtype == "fp32" else "ieee"


# Head-transform variants of the two matmul kernels (constexpr flags; "" is the plain kernel every
# call without a transform compiles). Each flag alone is compiled for bf16; every flag at once
# (the most live state: bias, softcap, entropy and the bias gradient) for every dtype. SCALE and
# SOFTCAP exclude each other in the kernels (softcap folds the scale into its constants).
TRANSFORM_VARIANTS = {
    "": {},
    "bias": dict(HAS_BIAS=True),
    "scale": dict(SCALE=True),
    "softcap": dict(SOFTCAP=True),
    "entropy": dict(ENTROPY=True),
    "all": dict(HAS_BIAS=True, SOFTCAP=True, ENTROPY=True),
}
# The backward's extra flags per variant: the bias gradient with a bias, the constant factor
# with a scale.
BACKWARD_EXTRA = {"bias": dict(NEED_DB=True), "scale": dict(FACTOR=True),
                  "all": dict(NEED_DB=True)}


def variants_for(dtype: str) -> list[str]:
    return list(TRANSFORM_VARIANTS) if dtype == "bf16" else ["", "all"]


def _matmul_config(direction: str, dt: str, variant: str, tiles) -> KernelConfig:
    """The forward kernel or the backward's G producer for one dtype and transform variant."""
    flags = {**dict(HAS_BIAS=False, SCALE=False, SOFTCAP=False, ENTROPY=False),
             **TRANSFORM_VARIANTS[variant]}
    # the launchers' choice: the forward's own tile with entropy, the producer's with any flag
    special = flags["ENTROPY"] if direction == "forward" else bool(variant)
    t = tiles.logprobs(direction, {"fp32": torch.float32}.get(dt, torch.bfloat16), special)
    common = dict(hidden_ptr=f"*{dt}", weight_ptr=f"*{dt}", labels_ptr="*i32", bias_ptr=f"*{dt}",
                  pre_scale="fp32", post_scale="fp32")
    if direction == "forward":
        kernel, name = _logprobs_forward_kernel, "logprobs_forward"
        types = dict(common, part_max_ptr="*fp32", part_sum_ptr="*fp32", label_logit_ptr="*fp32",
                     part_ent_ptr="*fp32", n_tokens="i32", vocab="i32", hidden_size="i32",
                     vocab_per_split="i32", num_splits="i32", group_n="i32")
        extra = {}
        divisible = ("part_max_ptr", "part_sum_ptr", "label_logit_ptr", "part_ent_ptr",
                     "vocab_per_split")
    else:
        kernel, name = _grad_logits_kernel, "grad_logits"
        types = dict(common, lse_ptr="*fp32", grad_ptr="*fp32", out_ptr=f"*{dt}",
                     colsum_ptr="*fp32", factor="fp32", n_tokens="i32", band="i32",
                     hidden_size="i32", band_start="i32")
        extra = dict(GROUP_N=t.group_n)
        flags.update({**dict(NEED_DB=False, FACTOR=False), **BACKWARD_EXTRA.get(variant, {})})
        divisible = ("lse_ptr", "grad_ptr", "out_ptr", "colsum_ptr", "band")
    return KernelConfig(
        name=f"{name}[{dt},{variant}]" if variant else f"{name}[{dt}]",
        kernel=kernel, types=types,
        constexprs=dict(BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_H=t.block_h, **extra,
                        DOT_PRECISION=_dot_precision(dt), UPCAST_DOT=False, **flags),
        num_warps=t.num_warps, num_stages=t.num_stages,
        divisible=("hidden_ptr", "weight_ptr", "labels_ptr", "bias_ptr", "hidden_size")
        + divisible,
    )


def kernel_configs(arch: str) -> list[KernelConfig]:
    """Every kernel configuration the launchers can pick on ``arch`` ("sm_80" or "sm_90")."""
    tiles = TILES[arch]
    e = tiles.elementwise
    out = [_matmul_config(direction, dt, variant, tiles)
           for direction in ("forward", "backward") for dt in DTYPES for variant in variants_for(dt)]
    for entropy in (False, True):
        out.append(KernelConfig(
            name="lse_combine[entropy]" if entropy else "lse_combine",
            kernel=_lse_combine_kernel,
            types=dict(part_max_ptr="*fp32", part_sum_ptr="*fp32", label_logit_ptr="*fp32",
                       logp_ptr="*fp32", lse_ptr="*fp32", n_tokens="i32", num_splits="i32",
                       part_ent_ptr="*fp32", entropy_ptr="*fp32", mu_ptr="*fp32"),
            constexprs=dict(BLOCK=e.block, ENTROPY=entropy),
            num_warps=e.num_warps, num_stages=1,
            divisible=("part_max_ptr", "part_sum_ptr", "label_logit_ptr", "logp_ptr", "lse_ptr",
                       "part_ent_ptr", "entropy_ptr", "mu_ptr"),
        ))
    out.append(KernelConfig(
        name="segment_sum",
        kernel=_segment_sum_kernel,
        types=dict(values_ptr="*fp32", seq_ids_ptr="*i64", out_ptr="*fp32", n_tokens="i32",
                   num_seqs="i32"),
        constexprs=dict(BLOCK_S=tiles.segment.block_s, BLOCK=tiles.segment.block),
        num_warps=tiles.segment.num_warps, num_stages=1,
        divisible=("values_ptr", "seq_ids_ptr", "out_ptr"),
    ))
    out.append(KernelConfig(
        name="gather_segments",
        kernel=_gather_segments_kernel,
        types=dict(seq_values_ptr="*fp32", seq_ids_ptr="*i64", out_ptr="*fp32", n_tokens="i32"),
        constexprs=dict(BLOCK=e.block), num_warps=e.num_warps, num_stages=1,
        divisible=("seq_values_ptr", "seq_ids_ptr", "out_ptr"),
    ))
    return out


def ptxas_path(capability: int) -> str:
    """The ptxas this Triton release runs for ``capability`` (3.9 uses its newer ``ptxas-blackwell``
    from sm_90 on; an older ptxas rejects the PTX version 3.9 emits)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return triton.knobs.nvidia.ptxas.path
    return get_ptxas(capability).path


def cuobjdump_path() -> str:
    return triton.knobs.nvidia.cuobjdump.path


@contextlib.contextmanager
def _triton_ptxas_log():
    """Capture the ``ptxas -v`` log of Triton's own ptxas run (its flags, its ptxas): Triton
    prints it when ``dump_ptxas_log`` is on; ``always_compile`` keeps the cache from skipping it."""
    nvidia, compilation = triton.knobs.nvidia, triton.knobs.compilation
    saved = (nvidia.dump_ptxas_log, compilation.always_compile)
    nvidia.dump_ptxas_log, compilation.always_compile = True, True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        nvidia.dump_ptxas_log, compilation.always_compile = saved


def _parse_ptxas_log(log: str) -> dict | None:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if not (regs and spill and stack):
        return None
    return {"registers": int(regs.group(1)), "spill_stores": int(spill.group(1)),
            "spill_loads": int(spill.group(2)), "stack_bytes": int(stack.group(1))}


def _ptxas_usage(ptx: str, capability: int) -> dict:
    """Fallback when Triton's log was not captured: ``ptxas -v`` run here with Triton's ptxas."""
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run([ptxas_path(capability), "-v", f"--gpu-name={arch}", src,
                               "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{ptxas_path(capability)} failed: {proc.stderr[-2000:]}")
    usage = _parse_ptxas_log(proc.stderr + proc.stdout)
    if usage is None:
        raise RuntimeError(f"could not read registers from ptxas -v output:\n{proc.stderr[-2000:]}")
    return usage


def disassemble(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin, with the cuobjdump that ships in the triton wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        return subprocess.run([cuobjdump_path(), "-sass", path], capture_output=True,
                              text=True, check=True).stdout


def _sass_mma(sass: str) -> str:
    """Tensor-core instruction families in the SASS, with counts."""
    counts = {}
    for m in re.findall(r"\b(HGMMA|HMMA|IMMA)\b", sass):
        counts[m] = counts.get(m, 0) + 1
    return "+".join(f"{m}x{counts[m]}" for m in sorted(counts)) or "-"


def _ptx_mma(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "-"


_MMA_RE = re.compile(r"(wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)"
                     r"|mma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col)\.f32\.(\w+)\.\w+")


def _ptx_mma_detail(ptx: str) -> tuple[list[str], list[str]]:
    """(operand types, instruction shapes) of the PTX tensor-core instructions."""
    types, shapes = set(), set()
    for m in _MMA_RE.finditer(ptx):
        shapes.add(m.group(2) or m.group(3))
        types.add(m.group(4))
    return sorted(types), sorted(shapes)


def compile_kernel(kernel, types: dict, constexprs: dict, arch: str, *, num_warps: int,
                   num_stages: int, divisible=(), maxnreg: int | None = None):
    """Compile one kernel for ``arch`` without a GPU: ``(compiled, ptxas usage or None)``."""
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            "the kernels were created by the Triton interpreter (TRITON_INTERPRET=1); "
            "use compile_report(), which compiles in a child process without it"
        )
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in kernel.arg_names}
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    with _triton_ptxas_log() as log:
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs),
            target=GPUTarget("cuda", ARCHS[arch], 32),
            options={"num_warps": num_warps, "num_stages": num_stages,
                     **({"maxnreg": maxnreg} if maxnreg else {})},
        )
    return compiled, _parse_ptxas_log(log.getvalue())


def compile_config(cfg: KernelConfig, arch: str) -> dict:
    """Compile one configuration for ``arch`` and measure it. Raises if compilation fails."""
    capability = ARCHS[arch]
    start = time.perf_counter()
    compiled, usage = compile_kernel(cfg.kernel, cfg.types, cfg.constexprs, arch,
                                     num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                     divisible=cfg.divisible, maxnreg=cfg.maxnreg)
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    source = "triton's ptxas run"
    if usage is None:
        usage, source = _ptxas_usage(ptx, capability), "ptxas re-run"
    sass = disassemble(compiled.asm["cubin"])
    mma_types, mma_shapes = _ptx_mma_detail(ptx)
    shared = int(compiled.metadata.shared)
    threads = cfg.num_warps * 32
    by_regs = REGISTERS_PER_SM // max(1, usage["registers"] * threads)
    by_shared = SHARED_MEMORY_LIMIT[arch] // shared if shared else MAX_BLOCKS_PER_SM
    blocks = min(by_regs, by_shared, THREADS_PER_SM // threads, MAX_BLOCKS_PER_SM)
    return {
        "kernel": cfg.name,
        "arch": arch,
        "tiles": "x".join(str(cfg.constexprs[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")
                          if k in cfg.constexprs) or str(cfg.constexprs.get("BLOCK", "")),
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        **usage,
        "usage_from": source,
        "shared_bytes": shared,
        "shared_limit": SHARED_MEMORY_LIMIT[arch],
        "blocks_per_sm": blocks,
        "ptx_mma": _ptx_mma(ptx),
        "mma_operand_types": mma_types,
        "mma_shapes": mma_shapes,
        "sass_mma": _sass_mma(sass),
        "hgmma_count": sass_check.hgmma_count(sass),
        "sass_local_memory_ops": sass_check.spill_instructions(sass),
        "wgmma_hazards": sass_check.wgmma_register_hazards(sass),
        "atomics": sass_check.atomic_instructions(sass),
        "compile_s": round(seconds, 2),
    }


def compile_report(archs=("sm_80", "sm_90")) -> list[dict]:
    """Compile every kernel configuration for each of ``archs``; one dict per configuration.

    Keys: kernel, arch, tiles, num_warps, num_stages, registers, spill_stores, spill_loads,
    stack_bytes, usage_from, shared_bytes, shared_limit, blocks_per_sm, ptx_mma (wgmma /
    mma.sync / -), mma_operand_types and mma_shapes (of the PTX tensor-core instructions),
    sass_mma, hgmma_count, sass_local_memory_ops (LDL/STL), wgmma_hazards (messages of
    ``sass_check.wgmma_register_hazards``), atomics (``sass_check.atomic_instructions``), compile_s.
    """
    if not isinstance(_logprobs_forward_kernel, JITFunction):
        return _report_in_child(archs)
    rows = []
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        for cfg in kernel_configs(arch):
            rows.append(compile_config(cfg, arch))
    return rows


def _report_in_child(archs) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "altpo_kernels.triton.aot_compile", "--json", "--arch", *archs]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ahead-of-time compile failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


COLUMNS = (
    ("arch", "arch"), ("kernel", "kernel"), ("tiles", "tiles NxVxH"), ("num_warps", "warps"),
    ("num_stages", "stages"), ("registers", "regs"), ("spill_stores", "spill st"),
    ("spill_loads", "spill ld"), ("shared_bytes", "smem B"), ("blocks_per_sm", "blocks/SM"),
    ("ptx_mma", "PTX mma"), ("sass_mma", "SASS mma"), ("hazards", "wgmma hazards"),
    ("atomics", "ATOM/RED"), ("compile_s", "compile s"),
)


def format_table(rows: list[dict]) -> str:
    """The report as an aligned text table (Markdown-compatible)."""
    header = [title for _, title in COLUMNS]
    body = [[str(len(row.get("wgmma_hazards", []))) if key == "hazards"
             else str(len(row.get("atomics", []))) if key == "atomics" else str(row[key])
             for key, _ in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def problems(rows: list[dict]) -> list[str]:
    """Configurations that spill, exceed the architecture's shared memory or register limits, have
    a wgmma register-operand hazard in their SASS, or contain any atomic instruction (ATOM/RED:
    their order, hence the rounding of a float sum, varies from run to run)."""
    bad = []
    for r in rows:
        where = f"{r['arch']} {r['kernel']}"
        if r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
        if r.get("sass_local_memory_ops"):
            bad.append(f"{where}: {r['sass_local_memory_ops']} local-memory (LDL/STL) instructions")
        for msg in r.get("wgmma_hazards", []):
            bad.append(f"{where}: wgmma register hazard: {msg}")
        if r.get("atomics"):
            bad.append(f"{where}: {len(r['atomics'])} atomic instructions (run-to-run order not "
                       f"fixed): {'; '.join(r['atomics'][:3])}")
        if r["shared_bytes"] > r["shared_limit"]:
            bad.append(f"{where}: {r['shared_bytes']} B shared memory > {r['shared_limit']} B")
        if r["registers"] > MAX_REGISTERS_PER_THREAD:
            bad.append(f"{where}: {r['registers']} registers")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m altpo_kernels.triton.aot_compile",
        description="Compile every altpo_kernels Triton kernel for sm_80/sm_90 without a GPU and "
                    "report registers, spills and shared memory.",
    )
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS),
                        help="architectures to compile for (default: both)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    rows = compile_report(tuple(args.arch))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(format_table(rows))
    bad = problems(rows)
    for msg in bad:
        print("PROBLEM:", msg)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
