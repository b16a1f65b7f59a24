"""altpo_kernels: a fused AltPO / DPO loss that never materialises the [tokens, vocab] logits.

    from altpo_kernels import linear_logprobs, altpo_loss, AltPOLoss

Backends: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked plain
torch, the CPU path), ``"reference"`` (materialised float64, the spec), ``"auto"``.
"""

from .altpo_loss import AltPOLoss, AltPOLossOutput, altpo_loss
from .backends import BACKENDS
from .linear_logprobs import linear_logprobs

__all__ = ["linear_logprobs", "altpo_loss", "AltPOLoss", "AltPOLossOutput", "BACKENDS"]
__version__ = "0.1.0"
