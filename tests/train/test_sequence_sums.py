"""Sequence sums of per-token log-probs against float64: never worse than a plain ``.sum()``."""

import torch

from altpo.train.sequence_sums import sequence_sums


def tofu_like_logprobs(seed: int):
    """Seeded per-token log-probs in [-14, 0), four sequences of 40 to 3000 tokens, interleaved ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = [40, 700, 3000, 1500]
    ids = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
    ids = ids[torch.randperm(len(ids), generator=g)]
    values = -(torch.rand(len(ids), generator=g, dtype=torch.float64) ** 3 * 14).float()
    return values, ids, len(lengths)


def test_error_against_float64_is_at_most_a_plain_sum():
    for seed in range(5):
        values, ids, s = tofu_like_logprobs(seed)
        got = sequence_sums(values, ids, s)
        assert got.dtype == torch.float32 and got.shape == (s,)
        for k in range(s):
            exact = values[ids == k].double().sum()
            plain = values[ids == k].sum()
            assert abs(float(got[k]) - float(exact)) <= abs(float(plain) - float(exact)) + 1e-12
        old = torch.zeros(s).index_add_(0, ids, values)   # the sequential fp32 accumulation it replaces
        exact_all = torch.zeros(s, dtype=torch.float64).index_add_(0, ids, values.double())
        old_err = float((old.double() - exact_all).abs().max())
        # at most half an fp32 ulp of each sum, where the sequential fp32 sum is many ulps off
        ulp = torch.finfo(torch.float32).eps * float(exact_all.abs().max())
        assert float((got.double() - exact_all).abs().max()) <= 0.5 * ulp < old_err


def test_gradient_reaches_every_token():
    values, ids, s = tofu_like_logprobs(7)
    values.requires_grad_(True)
    weights = torch.randn(s, generator=torch.Generator().manual_seed(1))
    (sequence_sums(values, ids, s) * weights).sum().backward()
    torch.testing.assert_close(values.grad, weights[ids], rtol=0, atol=0)
