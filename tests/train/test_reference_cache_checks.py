"""The reference cache is reused only when its numbers are the ones that were written, fit the
data and are finite; otherwise it is computed again and the run says why."""

import torch
from safetensors import safe_open

from altpo.train import train
from altpo.train.config import TrainConfig
from helpers import base_settings

CACHE = "reference_logprobs.safetensors"


def _stored(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), f.get_tensor("forget").clone(), f.get_tensor("alternates").clone()


def _flip_a_bit(path, tensor_value):
    """Flip the lowest bit of the first byte of ``tensor_value``'s float32 bytes in the file."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor_value.numpy().tobytes())
    assert at > 0
    data[at] ^= 1
    path.write_bytes(bytes(data))


def test_each_kind_of_bad_cache_is_refused_with_its_reason(tofu_dir, model_dir, tmp_path):
    from altpo.train.reference_cache import ReferenceLogprobs, read_reference_logprobs, save_reference_logprobs

    out = tmp_path / "run"
    train(TrainConfig(**base_settings(tofu_dir, model_dir, out, max_steps=1)))
    meta, forget, alternates = _stored(out / CACHE)
    key, expected = meta["key"], (forget.numel(), alternates.numel())
    good, why = read_reference_logprobs(out / CACHE, key, expected)
    assert why is None and torch.equal(good.forget, forget)

    cases = {
        "nan": (ReferenceLogprobs(forget.clone().index_fill_(0, torch.tensor([1]), float("nan")),
                                  alternates, key), "hold NaN or infinite"),
        "inf": (ReferenceLogprobs(forget, alternates.clone().index_fill_(0, torch.tensor([0]), float("-inf")),
                                  key), "hold NaN or infinite"),
        "shape": (ReferenceLogprobs(torch.cat([forget, forget[:1]]), alternates, key), "shape (5,)"),
        "int": (ReferenceLogprobs(forget.round().long(), alternates, key), "torch.int64"),
    }
    for name, (ref, reason) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_reference_logprobs(path, ref)  # a consistent checksum: only the other checks can refuse
        loaded, why = read_reference_logprobs(path, key, expected)
        assert loaded is None and reason in why, (name, why)

    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes((out / CACHE).read_bytes())
    _flip_a_bit(flipped, forget[:1])
    loaded, why = read_reference_logprobs(flipped, key, expected)
    assert loaded is None and "do not match their checksum" in why


def test_a_flipped_bit_is_recomputed_so_step_one_has_zero_delta(tofu_dir, model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    settings = base_settings(tofu_dir, model_dir, out, max_steps=1)
    first = train(TrainConfig(**settings))
    _, forget, _ = _stored(out / CACHE)
    _flip_a_bit(out / CACHE, forget[:1])
    capsys.readouterr()
    again = train(TrainConfig(**{**settings, "overwrite": True, "quiet": False}))
    err = capsys.readouterr().err
    assert "not reusing" in err and "do not match their checksum" in err
    assert not again.reference_reused
    # the policy is the reference at step 1: delta is 0 with the honest cache
    assert abs(again.history[0]["delta_mean"]) < 1e-3
    assert again.history[0]["loss"] == first.history[0]["loss"]
    _, recomputed, _ = _stored(out / CACHE)
    assert torch.equal(recomputed, forget)
