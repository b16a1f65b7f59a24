"""Triton backend of altpo_kernels: fused linear log-prob forward/backward and the AltPO
epilogue's per-token kernels.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before triton is imported). Implements the backend interface described in
``altpo_kernels.torch_chunked``:

    logprobs_forward(hidden, weight, labels) -> (logp [N] fp32, lse [N] fp32)
    logprobs_backward(hidden, weight, labels, lse, grad_logp, need_dh, need_dw) -> (dH, dW)
    segment_sum(values [N] fp32, seq_ids [N], num_seqs) -> [S] fp32
    gather_segments(seq_values [S] fp32, seq_ids [N]) -> [N] fp32

and the head transforms (bias, logit scale, softcap, temperature, entropy) with the interface of
``torch_chunked.transformed_forward`` / ``transformed_backward``: the same kernels with constexpr
flags that compile the transform (and its derivative) into each logits tile.

``logprobs_backward`` is the shared chunk loop of ``altpo_kernels.chunked_backward`` with this
backend's G producer (``logprobs_backward.produce_g``). ``aot_compile`` compiles every kernel
configuration for sm_80 and sm_90 without a GPU and reports registers, spills and shared memory;
``sass_check`` reads the compiled SASS for spills and wgmma register-operand hazards.
"""

from .interpreter_compat import patch_interpreter_index

patch_interpreter_index()

from .logprobs_backward import logprobs_backward, transformed_backward
from .logprobs_forward import logprobs_forward, transformed_forward
from .segment_ops import gather_segments, segment_sum

__all__ = ["logprobs_forward", "logprobs_backward", "segment_sum", "gather_segments",
           "transformed_forward", "transformed_backward"]
