"""Forward of the fused linear log-prob: per-token ``log_softmax(h W^T)[label]`` and log-sum-exp.

Grid: token blocks x vocabulary splits, as a 1-D grid in groups (:func:`program_order`): a group
is ``group_n`` token blocks times every split, so the programs resident at one time re-read a
bounded set of hidden-state blocks, which stays in L2. Each program owns ``BLOCK_N`` tokens and one
contiguous range of the vocabulary. It walks that range in ``BLOCK_V`` tiles; each logits tile is a
``tl.dot`` over ``BLOCK_H`` slices of the hidden dimension with fp32 accumulation, folded straight
into a running (max, sum of exp) per token -- the online log-sum-exp -- and the tile is dropped.
The label's logit is picked up in whichever tile holds it. Per split the program writes only the
partial (max, sum) of its tokens; a second tiny kernel combines the [splits, N] partials into the
[N] log-sum-exp and the log-prob. No [N, V] tensor exists at any point.

Splitting the vocabulary is what keeps a GPU busy when there are few tokens: 4096 tokens are only
32 blocks of 128, against 132 SMs on an H100. The split count is chosen by counting waves
(:func:`vocab_split`): at N=4096, V=128256 on 132 SMs it picks 4 splits, 32 x 4 = 128 programs of
251 tiles in one wave (within 4 % of the ideal time), where the earlier "about four waves" rule ran
544 programs of 59 tiles in 5 waves, the last one 12 % full (82 % of the ideal).

Why groups: with one split (N >= 16384 by the wave rule alone) all 128 resident programs walk the
vocabulary together, sharing each weight tile, but each re-reads its own 512 KiB hidden-state block
(H = 2048, bf16) for every tile: 64 MiB, more than L2, so every re-read goes to HBM (about 68 GB
at N = 16384, V = 128256). :func:`token_group` caps the hidden-state blocks a wave touches at
``L2_HIDDEN_BUDGET`` (32 blocks of 512 KiB), and the split count is at least ``ceil(slots /
group_n)`` so that one wave covers one group: at N = 16384 on 132 SMs, 5 splits (640 programs in 5
waves, 97 % of the ideal time by the wave count); the group's 16 MiB of hidden states stays in L2,
and the weight is streamed once per group (4 groups x 0.5 GB = 2.1 GB of HBM reads in all). At
N = 4096 the 32 token blocks are one group and the wave rule's 4 splits stand.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..head_constants import transform_constants
from .tile_configs import interpreting, sm_count, tiles_for


@triton.jit
def dot_accumulate(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + a @ b`` in fp32.

    ``UPCAST_DOT`` is set only under the Triton interpreter, whose ``tl.dot`` multiplies the raw
    bit patterns of bf16 operands (triton issue 11584); upcasting first gives the right product.
    The GPU build never sets it, so what the GPU compiles is the plain tensor-core dot.
    """
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def logits_tile(h_rows, w_rows, row_ok, col_ok, hidden_size,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One [BLOCK_N, BLOCK_V] tile of logits in fp32, summed over the hidden size in BLOCK_H slices.

    ``h_rows`` / ``w_rows`` point at the tile's hidden-state and weight rows; masked rows, columns
    and the ragged last slice load zeros. Forward and backward share it, so backward recomputes
    exactly the logits forward saw.
    """
    logits = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for h0 in range(0, hidden_size, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        k_ok = ks < hidden_size
        h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        logits = dot_accumulate(h, tl.trans(w), logits, DOT_PRECISION, UPCAST_DOT)
    return logits


@triton.jit
def grouped_program(pid, num_n, num_other, group_n):
    """``(pid_n, pid_other)`` of program ``pid`` in a grouped 1-D grid of ``num_n`` token blocks x
    ``num_other`` (vocabulary splits or tiles): consecutive programs (those resident at the same
    time) cover ``group_n`` token blocks times every ``other`` before moving to the next group, so
    together they re-read only ``group_n`` hidden-state blocks from L2. ``program_order`` in Python
    is the same map."""
    per_group = group_n * num_other
    first = (pid // per_group) * group_n
    in_group = tl.minimum(num_n - first, group_n)
    return first + (pid % per_group) % in_group, (pid % per_group) // in_group


@triton.jit
def fast_tanh(x):
    """tanh from one exponential: ``1 - 2 / (exp(2x) + 1)``, exactly +-1 once exp overflows or
    underflows (no NaN for any finite x); absolute error a few fp32 ulps of 1."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def head_transform(logits, cols, col_ok, bias_ptr, pre_scale, post_scale,
                   HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """``(u, t)``: the transformed logits tile and, with ``SOFTCAP``, the tanh it was made from.

    The head's order (``reference.transformed_logits_reference``): ``z = (hW^T + b) * logit_scale``,
    ``softcap * tanh(z / softcap)``, ``/ temperature``. The launcher folds the constants:
    with SOFTCAP ``pre_scale = logit_scale / softcap`` and ``post_scale = softcap / temperature``,
    so ``u = post_scale * tanh(pre_scale * (hW^T + b))``; without it ``pre_scale = logit_scale /
    temperature`` multiplies when ``SCALE``. All flags off returns the tile untouched.
    """
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        logits = logits + b[None, :]
    t = logits
    if SOFTCAP:
        t = fast_tanh(logits * pre_scale)
        logits = t * post_scale
    elif SCALE:
        logits = logits * pre_scale
    return logits, t


@triton.jit
def _logprobs_forward_kernel(
    hidden_ptr, weight_ptr, labels_ptr,
    part_max_ptr, part_sum_ptr, label_logit_ptr,
    n_tokens, vocab, hidden_size, vocab_per_split, num_splits, group_n,
    bias_ptr, part_ent_ptr, pre_scale, post_scale,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr = False, SCALE: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
    ENTROPY: tl.constexpr = False,
):
    # Grouped 1-D grid (grouped_program): the programs resident at one time share group_n
    # hidden-state blocks in L2 for every vocabulary tile.
    pid_n, split = grouped_program(tl.program_id(0), tl.cdiv(n_tokens, BLOCK_N), num_splits, group_n)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_tokens
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    # 64-bit row offsets: vocab * hidden_size passes 2**31 for large models (256k x 8192).
    h_rows = hidden_ptr + rows.to(tl.int64)[:, None] * hidden_size
    v_begin = split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, vocab)

    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    # ENTROPY: sum of exp(u - run_max) * (u - run_max), kept relative to the running max so that
    # entropy = log(sum) - this / sum has no cancellation against the max.
    run_ent = tl.zeros([BLOCK_N], tl.float32)
    label_logit = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        w_rows = weight_ptr + cols.to(tl.int64)[:, None] * hidden_size
        logits = logits_tile(h_rows, w_rows, row_ok, col_ok, hidden_size,
                             BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
        logits, _ = head_transform(logits, cols, col_ok, bias_ptr, pre_scale, post_scale,
                                   HAS_BIAS, SCALE, SOFTCAP)
        # The label is picked before the exponentials so that the logits tile dies as they are
        # formed (one [BLOCK_N, BLOCK_V] fp32 tile live, not two: what keeps 128 x 256 unspilled).
        label_logit += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        # Every tile has at least one real column, so new_max is finite and exp(-inf - m) = 0
        # handles the first tile without a special case.
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        rescale = tl.exp(run_max - new_max)
        if ENTROPY:
            shifted = logits - new_max[:, None]
            e = tl.exp(shifted)
            # the old terms move to the new max: sum e' (u - m_old) -> r (that + sum (m_old - m_new))
            moved = tl.where(run_sum > 0, run_ent + run_sum * (run_max - new_max), 0.0)
            run_ent = moved * rescale + tl.sum(tl.where(col_ok[None, :], e * shifted, 0.0), axis=1)
            run_sum = run_sum * rescale + tl.sum(e, axis=1)
        else:
            run_sum = run_sum * rescale + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max

    out = split * n_tokens + rows
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
    if ENTROPY:
        tl.store(part_ent_ptr + out, run_ent, mask=row_ok)
    # Exactly one split holds each label, so each token's label logit is written once.
    owns_label = row_ok & (labels >= v_begin) & (labels < v_end)
    tl.store(label_logit_ptr + rows, label_logit, mask=owns_label)


@triton.jit
def _lse_combine_kernel(
    part_max_ptr, part_sum_ptr, label_logit_ptr, logp_ptr, lse_ptr,
    n_tokens, num_splits, part_ent_ptr, entropy_ptr, mu_ptr,
    BLOCK: tl.constexpr, ENTROPY: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n_tokens
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    for s in range(num_splits):
        top = tl.maximum(top, tl.load(part_max_ptr + s * n_tokens + rows, mask=row_ok, other=0.0))
    total = tl.zeros([BLOCK], tl.float32)
    ent = tl.zeros([BLOCK], tl.float32)
    for s in range(num_splits):
        m = tl.load(part_max_ptr + s * n_tokens + rows, mask=row_ok, other=0.0)
        part = tl.load(part_sum_ptr + s * n_tokens + rows, mask=row_ok, other=1.0)
        total += part * tl.exp(m - top)
        if ENTROPY:
            # the split's sum e (u - m) moved to the common max: e' (u - top) = r (that + e (m - top))
            part_ent = tl.load(part_ent_ptr + s * n_tokens + rows, mask=row_ok, other=0.0)
            ent += (part_ent + part * (m - top)) * tl.exp(m - top)
    lse = top + tl.log(total)
    label_logit = tl.load(label_logit_ptr + rows, mask=row_ok, other=0.0)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, label_logit - lse, mask=row_ok)
    if ENTROPY:
        # entropy = lse - E_p[u] = log(total) - sum e (u - top) / total; mu = E_p[u] for backward
        entropy = tl.log(total) - ent / total
        tl.store(entropy_ptr + rows, entropy, mask=row_ok)
        tl.store(mu_ptr + rows, lse - entropy, mask=row_ok)


def dot_precision(dtype: torch.dtype) -> str:
    """Tensor-core precision of the dots: fp32 inputs use 3xTF32, close to fp32 accuracy
    (plain TF32 would leave ~1e-3 relative error in the logits); 16-bit inputs are exact anyway."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


# A split count whose launch takes at most this much longer than the best one is preferred when it
# has fewer splits: fewer waves, fewer partials to combine, longer runs per program.
SPLIT_SLACK = 1.04
# Hidden-state bytes the programs resident at one time may share in L2 (H100: 50 MB, H200: 60 MB;
# A100: 40 MB): a third of the smallest leaves room for the weight tiles and other traffic.
L2_HIDDEN_BUDGET = 16 * 2**20


def program_order(pid: int, n_tokens: int, block_n: int, num_splits: int, group_n: int):
    """(token block, split) of program ``pid`` in the forward's grouped grid (the kernel's map)."""
    token_blocks = -(-n_tokens // block_n)
    per_group = group_n * num_splits
    first = (pid // per_group) * group_n
    in_group = min(token_blocks - first, group_n)
    return first + (pid % per_group) % in_group, (pid % per_group) // in_group


def token_group(n_tokens: int, hidden_size: int, block_n: int, elem_bytes: int, slots: int,
                budget: int = L2_HIDDEN_BUDGET) -> int:
    """Token blocks per group: as many as fit ``budget`` bytes of hidden states (each block is
    ``block_n x hidden_size`` elements), at most one wave's worth, at least one."""
    token_blocks = -(-n_tokens // block_n)
    fit = max(1, budget // max(1, block_n * hidden_size * elem_bytes))
    return max(1, min(token_blocks, slots, fit))


def vocab_split(n_tokens: int, vocab: int, block_n: int, block_v: int, slots: int,
                min_splits: int = 1) -> tuple[int, int]:
    """(number of splits, vocabulary entries per split) for ``slots`` programs running at once
    (SMs x resident blocks).

    A program costs about ``per_split / block_v`` tile times and a launch runs in
    ``ceil(programs / slots)`` waves, so it takes ``waves x tiles per split``. Among the split
    counts within ``SPLIT_SLACK`` of the fastest, the smallest is chosen. Each split covers a whole
    number of ``block_v`` tiles; no split is empty. Split counts below ``min_splits`` are not
    considered (the L2 grouping's floor; clamped to the number of tiles).
    """
    token_blocks = triton.cdiv(n_tokens, block_n)
    tiles = triton.cdiv(vocab, block_v)
    options = {}
    floor = max(1, min(min_splits, tiles))
    for wanted in range(floor, max(floor, min(tiles, triton.cdiv(16 * slots, token_blocks))) + 1):
        per = triton.cdiv(tiles, wanted)
        splits = triton.cdiv(tiles, per)
        if splits < floor:
            continue
        options.setdefault(splits, (triton.cdiv(token_blocks * splits, slots) * per, per))
    best = min(cost for cost, _ in options.values())
    splits = min(s for s, (cost, _) in options.items() if cost <= best * SPLIT_SLACK)
    return splits, options[splits][1] * block_v


def logprobs_forward(hidden, weight, labels, *, vocab_splits: int | None = None,
                     group_n: int | None = None):
    """Per-token log-probs and log-sum-exp of ``hidden @ weight.T`` without the logits.

    Args:
        hidden: [N, H] fp32/bf16/fp16, contiguous. weight: [V, H], same dtype. labels: [N] int32 or
            int64 in [0, V) (ignored rows already removed by the caller).
        vocab_splits: force this many vocabulary splits (tests); default: the split count that
            finishes in the fewest tile-times on this device (:func:`vocab_split`), raised where
            needed so that one wave's programs span at most ``group_n`` token blocks.
        group_n: token blocks per program group (default :func:`token_group`: the hidden-state
            blocks of a group fit ``L2_HIDDEN_BUDGET``).

    Returns ``(logp [N] fp32, lse [N] fp32)``.
    """
    out = _forward(hidden, weight, labels, vocab_splits=vocab_splits, group_n=group_n)
    return out["logp"], out["lse"]


def transformed_forward(hidden, weight, labels, bias, tf, *, entropy: bool = True,
                        vocab_splits: int | None = None, group_n: int | None = None):
    """``(logp, entropy, lse, mu)`` fp32 [N] of the head with an optional ``bias`` [V] and the
    transform ``tf`` (``torch_chunked.HeadTransform`` or None), the interface of
    ``torch_chunked.transformed_forward``. ``entropy=False`` skips the entropy state in the
    kernels and returns None for entropy and mu. ``mu`` is ``E_p[u] = lse - entropy``."""
    out = _forward(hidden, weight, labels, vocab_splits=vocab_splits, group_n=group_n, bias=bias,
                   tf=tf, entropy=entropy)
    return out["logp"], out.get("entropy"), out["lse"], out.get("mu")


def _forward(hidden, weight, labels, *, vocab_splits=None, group_n=None, bias=None, tf=None,
             entropy: bool = False) -> dict:
    # int32 ids inside the kernels: half the label traffic, 32-bit compares and index math.
    hidden, weight = hidden.contiguous(), weight.contiguous()
    labels = labels.to(torch.int32).contiguous()
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    tiles = tiles_for(device)
    # the entropy state needs more registers: its own tile where the plain one is too large
    t = tiles.logprobs("forward", hidden.dtype, transformed=entropy)
    slots = tiles.forward_blocks_per_sm * sm_count(device)
    if group_n is None:
        group_n = token_group(n, hidden_size, t.block_n, hidden.element_size(), slots)
    if group_n < 1:
        raise ValueError(f"group_n must be >= 1, got {group_n}")
    tiles_v = triton.cdiv(vocab, t.block_v)
    if vocab_splits is None:
        # A wave of `slots` programs spans slots / splits token blocks: at least enough splits
        # that it spans one group, so the hidden-state blocks it re-reads stay in L2.
        floor = triton.cdiv(slots, group_n) if triton.cdiv(n, t.block_n) > group_n else 1
        splits, per_split = vocab_split(n, vocab, t.block_n, t.block_v, slots, min_splits=floor)
    else:
        per_split = triton.cdiv(tiles_v, max(1, min(vocab_splits, tiles_v))) * t.block_v
        splits = triton.cdiv(vocab, per_split)
    part_max = torch.empty(splits, n, dtype=torch.float32, device=device)
    part_sum = torch.empty(splits, n, dtype=torch.float32, device=device)
    label_logit = torch.empty(n, dtype=torch.float32, device=device)
    out = {"logp": torch.empty(n, dtype=torch.float32, device=device),
           "lse": torch.empty(n, dtype=torch.float32, device=device)}
    # Flags off: their pointer arguments are never read; any fp32 buffer stands in.
    part_ent = torch.empty(splits, n, dtype=torch.float32, device=device) if entropy else part_max
    if entropy:
        out["entropy"] = torch.empty(n, dtype=torch.float32, device=device)
        out["mu"] = torch.empty(n, dtype=torch.float32, device=device)
    k = transform_constants(tf)
    with _on_device(device):
        _logprobs_forward_kernel[(triton.cdiv(n, t.block_n) * splits,)](
            hidden, weight, labels, part_max, part_sum, label_logit,
            n, vocab, hidden_size, per_split, splits, group_n,
            bias if bias is not None else weight, part_ent, k["pre_scale"], k["post_scale"],
            BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_H=t.block_h,
            DOT_PRECISION=dot_precision(hidden.dtype), UPCAST_DOT=interpreting(),
            HAS_BIAS=bias is not None, SCALE=k["SCALE"], SOFTCAP=k["SOFTCAP"], ENTROPY=entropy,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )
        e = tiles.elementwise
        _lse_combine_kernel[(triton.cdiv(n, e.block),)](
            part_max, part_sum, label_logit, out["logp"], out["lse"], n, splits,
            part_ent, out.get("entropy", part_max), out.get("mu", part_max),
            BLOCK=e.block, ENTROPY=entropy, num_warps=e.num_warps,
        )
    return out


def _on_device(device: torch.device):
    """Launch on the tensors' GPU even when another one is current (multi-GPU processes)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
