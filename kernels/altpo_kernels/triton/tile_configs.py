"""Tile shapes of the Triton kernels, per target: sm_80 (A100), sm_90 (H100/H200), interpreter.

Every number here was checked with the ahead-of-time compile report
(``python -m altpo_kernels.triton.aot_compile``): no register spills, shared memory within the
architecture's per-block limit. The reason for each choice sits next to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

# Largest dynamic shared memory one block may opt into (bytes): 163 KiB on A100, 227 KiB on H100.
SHARED_MEMORY_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
# 64K 32-bit registers per SM on both; a thread may use at most 255.
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255


@dataclass(frozen=True)
class LogprobsTiles:
    """Tiles of the log-prob forward kernel and of the backward's G producer.

    ``block_n`` tokens x ``block_v`` vocabulary entries of logits are held in registers (fp32);
    the hidden dimension is walked in ``block_h`` slices through shared memory, ``num_stages`` of
    them in flight. ``group_n`` orders the G producer's programs so that programs running at the
    same time share token blocks and vocabulary tiles in L2.
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
class SegmentTiles:
    """The segment sum: a program owns ``block_s`` sequences and walks the tokens ``block`` at a
    time, reducing a ``block_s x block`` masked tile per step (no atomics)."""

    block_s: int
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
    # Forward blocks resident per SM (registers and shared memory allow one for the 16-bit tiles):
    # ``vocab_split`` counts waves of ``forward_blocks_per_sm x SMs`` programs.
    forward_blocks_per_sm: int
    # 32 sequences x 256 tokens over 4 warps: 64 values a thread, no shared-memory staging.
    segment: SegmentTiles = SegmentTiles(block_s=32, block=256, num_warps=4)
    # 16-bit kernels with a head transform compiled in, where its live state does not fit the plain
    # kernel's tile (None: the plain tile): the forward with the entropy state, the G producer with
    # any transform flag.
    forward_transform: LogprobsTiles | None = None
    backward_transform: LogprobsTiles | None = None

    def logprobs(self, direction: str, dtype: torch.dtype, transformed: bool = False) -> LogprobsTiles:
        """Tiles of the ``"forward"`` or ``"backward"`` kernel for inputs of ``dtype``
        (``transformed``: the forward with entropy, the G producer with any transform flag)."""
        suffix = "_fp32" if dtype == torch.float32 else ""
        special = getattr(self, direction + "_transform") if transformed and not suffix else None
        return special or getattr(self, direction + suffix)


# sm_80, mma.sync m16n8k16: 128 x 128 fp32 logits over 8 warps is 64 accumulator registers a
# thread plus the A/B fragments loaded by ldmatrix: 248 registers, no spills, one block per SM.
# Without wgmma the fragments sit in registers, so the hidden slice stays 32 wide (64 wide reaches
# the 255 ceiling); 3 cp.async stages of 16 KiB hide the load latency. The G producer (backward)
# uses the same tile and pipeline (one dot chain, then a store).
_SM80_TILE = LogprobsTiles(block_n=128, block_v=128, block_h=32, num_warps=8, num_stages=3)
# sm_80 fp32 (3xTF32), both directions: 64 x 64 x 32 over 4 warps, 255 registers without spills,
# two blocks per SM; 128 x 128 spills over a kilobyte a thread.
_SM80_FP32 = LogprobsTiles(block_n=64, block_v=64, block_h=32, num_warps=4, num_stages=3)
# sm_90 fp32, both directions: 128 x 64 keeps the 3xTF32 fragments at 190 registers with 64 KiB
# shared memory; 128 x 128 x 64 needs 256 KiB (over the limit) and spills. The G producer is the
# forward's tile minus the online softmax state.
_SM90_FP32 = LogprobsTiles(block_n=128, block_v=64, block_h=32, num_warps=8, num_stages=3)
# The interpreter runs every program in numpy on the CPU: 16-wide tiles (the smallest tl.dot
# accepts) keep test shapes tiny while still covering several tiles, ragged edges and vocabulary
# splits; the G producer groups 2 token blocks so that test shapes cross a group boundary.
_INTERPRETER = LogprobsTiles(block_n=16, block_v=16, block_h=16, num_warps=1, num_stages=1)
_INTERPRETER_BWD = replace(_INTERPRETER, group_n=2)

TILES = {
    "sm_90": ArchTiles(
        # 128 x 128 fp32 logits over 8 warps = two warpgroups, each issuing m64n128k16 wgmma on
        # its half: 64 accumulator registers a thread. A 64-wide hidden slice of both operands is
        # 32 KiB of bf16, so 4 stages take 128 KiB of the 227 KiB. 128 x 256 x 64 fits 255
        # registers on triton 3.6 but spills 212 B a thread on 3.9 (the online-softmax state on top
        # of 128 accumulator registers), so the forward keeps 128 x 128 and gets its "fewer waves"
        # from vocab_split: N=4096, V=128256 runs as one wave of 128 programs.
        forward=LogprobsTiles(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=4),
        # The G producer (backward) is the forward's logits tile plus an epilogue that stores
        # g * (onehot - p) as a 16-bit tile: the same 128 x 256 x 64 shape fits 255 registers
        # without spills. A [4096, 2048] chunk x band is 32 x 8 = 256 programs, two full waves.
        backward=LogprobsTiles(block_n=128, block_v=256, block_h=64, num_warps=8, num_stages=3),
        # With a transform the producer keeps more of the tile live (the bias row, tanh for the
        # softcap derivative, p (u - mu) for entropy): at 128 x 256 that spills (376 B a thread
        # with every flag on, 4 B with the bias alone), so it takes the forward's 128 x 128 tile.
        backward_transform=LogprobsTiles(block_n=128, block_v=128, block_h=64, num_warps=8,
                                         num_stages=4),
        # The transformed forward: the entropy state (a second running sum and exp(u - m) (u - m)
        # over the tile) takes 128 x 128 to 255 registers on triton 3.6 and 8 B of spills on 3.9,
        # so it runs 128 x 64 (m64n64k16 per warpgroup, half the accumulator registers).
        forward_transform=LogprobsTiles(block_n=128, block_v=64, block_h=64, num_warps=8,
                                        num_stages=4),
        forward_fp32=_SM90_FP32,
        backward_fp32=_SM90_FP32,
        elementwise=ElementwiseTiles(block=1024, num_warps=4),
        forward_blocks_per_sm=1,
    ),
    "sm_80": ArchTiles(
        forward=_SM80_TILE,
        backward=_SM80_TILE,
        forward_fp32=_SM80_FP32,
        backward_fp32=_SM80_FP32,
        elementwise=ElementwiseTiles(block=1024, num_warps=4),
        forward_blocks_per_sm=1,
    ),
    "interpreter": ArchTiles(
        forward=_INTERPRETER,
        backward=_INTERPRETER_BWD,
        forward_fp32=_INTERPRETER,
        backward_fp32=_INTERPRETER_BWD,
        elementwise=ElementwiseTiles(block=16, num_warps=1),
        forward_blocks_per_sm=1,
        # 4 sequences x 16 tokens: test shapes cross several sequence tiles and token blocks.
        segment=SegmentTiles(block_s=4, block=16, num_warps=1),
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
        tiles = replace(tiles, **{d: _with_stages(getattr(tiles, d), 2) for d in (
            "forward", "backward", "forward_fp32", "backward_fp32", "forward_transform",
            "backward_transform")
            if getattr(tiles, d) is not None})
    return tiles


def _with_stages(t: LogprobsTiles, stages: int) -> LogprobsTiles:
    return replace(t, num_stages=min(t.num_stages, stages))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small stand-in under the interpreter)."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count
