"""altpo_kernels: fused unlearning losses that never materialise the [tokens, vocab] logits.

    from altpo_kernels import linear_logprobs, altpo_loss, AltPOLoss
    from altpo_kernels import unlearning_loss      # method=any name of REGISTRY, or your own
    from altpo_kernels import Method, register_method, check_method   # your own method
    from altpo_kernels import packed_hidden_states, batch_answer_logprobs   # transformers models

Backends: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked plain
torch, the CPU path), ``"cuda"`` (cuBLAS + CUDA C++ epilogues), ``"reference"`` (materialised
float64, the spec), ``"auto"``.
"""

from .altpo_loss import AltPOLoss, AltPOLossOutput, altpo_loss
from .backends import BACKENDS
from .hf import answer_hidden_states, batch_answer_logprobs, packed_hidden_states
from .linear_logprobs import linear_logprobs
from .method_check import check_method
from .methods import REGISTRY, Method, SequenceLogprobs, get_method, register_method
from .unlearning_loss import METHODS, UnlearningLoss, UnlearningLossOutput, unlearning_loss

__all__ = ["linear_logprobs", "altpo_loss", "AltPOLoss", "AltPOLossOutput", "BACKENDS",
           "unlearning_loss", "UnlearningLoss", "UnlearningLossOutput", "METHODS", "REGISTRY",
           "Method", "SequenceLogprobs", "register_method", "get_method", "check_method",
           "packed_hidden_states", "answer_hidden_states", "batch_answer_logprobs"]
__version__ = "0.1.0"
