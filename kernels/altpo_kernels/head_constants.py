"""The head transform's constants as the fused kernels take them (triton and cuda backends alike).

``torch_chunked.HeadTransform`` holds the user's settings (logit scale, softcap, temperature);
the kernels fold them into two multipliers around the tanh and a derivative factor, and with fp16
G tiles the producers scale G by :func:`fp16_output_scale`.
"""

from __future__ import annotations

import math


def transform_constants(tf) -> dict:
    """The kernels' scalars and flags for a ``torch_chunked.HeadTransform`` (None: identity).

    ``pre_scale`` / ``post_scale`` as the kernels take them (``u = post * tanh(pre * z)`` with
    softcap, ``u = pre * z`` without); ``dscale`` =
    ``logit_scale / temperature``, the derivative's constant factor (times ``1 - tanh^2`` with
    softcap). ``SCALE`` is off when the product is exactly 1, so a bias-only or entropy-only
    call does no multiply.
    """
    if tf is None:
        return dict(pre_scale=1.0, post_scale=1.0, dscale=1.0, SCALE=False, SOFTCAP=False)
    dscale = tf.logit_scale / tf.temperature
    if tf.softcap is not None:
        return dict(pre_scale=tf.logit_scale / tf.softcap, post_scale=tf.softcap / tf.temperature,
                    dscale=dscale, SCALE=False, SOFTCAP=True)
    return dict(pre_scale=dscale, post_scale=1.0, dscale=dscale, SCALE=dscale != 1.0, SOFTCAP=False)


def fp16_output_scale(dscale: float, entropy: bool, vocab: int) -> float:
    """A power of two ``s`` that keeps ``s G`` within fp16 when the chunk loop has scaled the
    upstream gradients to at most 2**14 (``chunked_backward``'s fp16 rule).

    ``|G_v| <= dscale (|g| + |g_ent| p_v |u_v - mu|)`` and ``p_v |u_v - mu| = p_v |log p_v + H|
    <= 1/e + log V`` (H <= log V), so ``s = 2**-ceil(log2(dscale (1 + [entropy] (1/e + log V))))``
    brings the bound back to 2**14 (the exponent clamped to [-60, 60]). Exact to undo (the GEMMs
    take ``alpha = 1 / s``).
    """
    bound = dscale * (1.0 + ((1.0 / math.e + math.log(max(vocab, 2))) if entropy else 0.0))
    # clamped like the loop's own scale, so that s and 1 / s stay normal fp32 numbers
    return 2.0 ** max(-60, min(60, -math.ceil(math.log2(bound))))
