"""Tile shapes of the Triton kernels, per target: sm_80 (A100), sm_90 (H100/H200), interpreter.

Every number here was checked with the ahead-of-time compile report
(``python -m altpo_kernels.triton.aot_compile``): no register spills, shared memory within the
architecture's per-block limit. The reason for each choice sits next to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Largest dynamic shared memory one block may opt into (bytes): 163 KiB on A100, 227 KiB on H100.
SHARED_MEMORY_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
# 64K 32-bit registers per SM on both; a thread may use at most 255.
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255


@dataclass(frozen=True)
class LogprobsTiles:
    """Tiles of the log-prob forward and backward kernels.

    ``block_n`` tokens x ``block_v`` vocabulary entries of logits are held in registers (fp32);
    the hidden dimension is walked in ``block_h`` slices through shared memory, ``num_stages`` of
    them in flight. ``group_n`` orders the backward's programs so that programs running at the same
    time share token blocks and vocabulary tiles in L2.
    """

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int
    group_n: int = 8


@dataclass(frozen=True)
class ElementwiseTiles:
    """One-dimensional kernels over tokens (log-sum-exp combine, segment sums, gathers)."""

    block: int
    num_warps: int


@dataclass(frozen=True)
class ArchTiles:
    forward: LogprobsTiles  # bf16 / fp16 inputs
    backward: LogprobsTiles
    # fp32 inputs: operands take twice the shared memory and 3xTF32 splits each into a high and a
    # low part (three MMAs, more live fragments), so their tiles are smaller.
    forward_fp32: LogprobsTiles
    backward_fp32: LogprobsTiles
    elementwise: ElementwiseTiles
    # Forward programs wanted per SM when choosing how many vocabulary splits to run: with fewer
    # token blocks than that, the vocabulary is split so that every SM stays busy. One block fits
    # an SM at a time (register use), so this is a number of waves; four keep the last, partly
    # empty wave under a quarter of the run time.
    forward_waves: int

    def logprobs(self, direction: str, dtype: torch.dtype) -> LogprobsTiles:
        """Tiles of the ``"forward"`` or ``"backward"`` kernel for inputs of ``dtype``."""
        suffix = "_fp32" if dtype == torch.float32 else ""
        return getattr(self, direction + suffix)


TILES = {
    "sm_90": ArchTiles(
        # 128 x 128 fp32 logits over 8 warps = two warpgroups, each issuing m64n128k16 wgmma on
        # its half: 64 accumulator registers a thread. A 64-wide hidden slice of both operands is
        # 32 KiB of bf16, so 4 stages take 128 KiB of the 227 KiB and keep loads well ahead of the
        # tensor cores. 232 registers, no spills: one block per SM, which is what a 128 x 128
        # wgmma tile wants anyway.
        forward=LogprobsTiles(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=4),
        # The backward holds the logits tile, then two 16-bit copies of D (for dH and dW) and the
        # fp32 dH [128 x 32] and dW [128 x 32] slices: a 32-wide hidden slice keeps that at 248
        # registers without spills (64-wide reaches 254). 128 x 128 tiles keep the atomic traffic
        # per flop low: (block_n + block_v) * H atomics per 6 * block_n * block_v * H flops.
        backward=LogprobsTiles(block_n=128, block_v=128, block_h=32, num_warps=8, num_stages=3),
        # fp32: 128 x 64 keeps the 3xTF32 fragments at 190 registers with 64 KiB shared memory;
        # 128 x 128 x 64 needs 256 KiB (over the limit) and spills.
        forward_fp32=LogprobsTiles(block_n=128, block_v=64, block_h=32, num_warps=8, num_stages=3),
        # fp32 backward: 64 x 64 tiles over 4 warps, 227 registers, 64 KiB, two blocks per SM;
        # 128 x 128 spills ~460 bytes a thread.
        backward_fp32=LogprobsTiles(block_n=64, block_v=64, block_h=32, num_warps=4, num_stages=2),
        elementwise=ElementwiseTiles(block=1024, num_warps=4),
        forward_waves=4,
    ),
    "sm_80": ArchTiles(
        # mma.sync m16n8k16: 128 x 128 fp32 logits over 8 warps is 64 accumulator registers a
        # thread plus the A/B fragments loaded by ldmatrix: 248 registers, no spills, one block
        # per SM. Without wgmma the fragments sit in registers, so the hidden slice stays 32 wide
        # (64 wide reaches the 255 ceiling); 3 cp.async stages of 16 KiB hide the load latency.
        forward=LogprobsTiles(block_n=128, block_v=128, block_h=32, num_warps=8, num_stages=3),
        # 208 registers and 96 KiB (two pipelined loops of 2 stages) of the 163 KiB; a third stage
        # adds 16 KiB and registers for little gain since each loaded slice feeds two MMAs.
        backward=LogprobsTiles(block_n=128, block_v=128, block_h=32, num_warps=8, num_stages=2),
        # fp32 (3xTF32): 64 x 64 x 32 over 4 warps, 255 registers without spills, two blocks per
        # SM; 128 x 128 spills over a kilobyte a thread.
        forward_fp32=LogprobsTiles(block_n=64, block_v=64, block_h=32, num_warps=4, num_stages=3),
        # fp32 backward: a 16-wide hidden slice is what stays spill-free (236 registers);
        # 32 wide spills 224 bytes a thread.
        backward_fp32=LogprobsTiles(block_n=64, block_v=64, block_h=16, num_warps=4, num_stages=3),
        elementwise=ElementwiseTiles(block=1024, num_warps=4),
        forward_waves=4,
    ),
    "interpreter": ArchTiles(
        # The interpreter runs every program in numpy on the CPU: 16-wide tiles (the smallest
        # tl.dot accepts) keep test shapes tiny while still covering several tiles, ragged edges
        # and vocabulary splits.
        forward=LogprobsTiles(block_n=16, block_v=16, block_h=16, num_warps=1, num_stages=1),
        backward=LogprobsTiles(block_n=16, block_v=16, block_h=16, num_warps=1, num_stages=1,
                               group_n=2),
        forward_fp32=LogprobsTiles(block_n=16, block_v=16, block_h=16, num_warps=1, num_stages=1),
        backward_fp32=LogprobsTiles(block_n=16, block_v=16, block_h=16, num_warps=1,
                                    num_stages=1, group_n=2),
        elementwise=ElementwiseTiles(block=16, num_warps=1),
        forward_waves=2,
    ),
}

# Number of "SMs" assumed by the interpreter when deciding vocabulary splits.
INTERPRETER_SMS = 2


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def arch_name(device: torch.device) -> str:
    """Which entry of ``TILES`` serves tensors on ``device``.

    Hopper and later get the sm_90 tiles; Ampere and Ada get sm_80's (``tiles_for`` trims the
    pipeline depth for the smaller shared memory of sm_86/sm_89).
    """
    if interpreting() or device.type != "cuda":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major >= 9 else "sm_80"


def tiles_for(device: torch.device) -> ArchTiles:
    """Tile shapes for tensors on ``device``."""
    name = arch_name(device)
    tiles = TILES[name]
    if name == "sm_80" and torch.cuda.get_device_capability(device) != (8, 0):
        # Consumer Ampere/Ada (sm_86, sm_89): 99 KiB of shared memory per block, so every
        # pipeline is cut to two stages (the largest, the backward, then needs 96 KiB).
        tiles = ArchTiles(
            forward=_with_stages(tiles.forward, 2),
            backward=_with_stages(tiles.backward, 2),
            forward_fp32=_with_stages(tiles.forward_fp32, 2),
            backward_fp32=_with_stages(tiles.backward_fp32, 2),
            elementwise=tiles.elementwise,
            forward_waves=tiles.forward_waves,
        )
    return tiles


def _with_stages(t: LogprobsTiles, stages: int) -> LogprobsTiles:
    return LogprobsTiles(t.block_n, t.block_v, t.block_h, t.num_warps, min(t.num_stages, stages),
                         t.group_n)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small stand-in under the interpreter)."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count
