"""altpo_loss as a drop-in loss with a transformers model: one packed row, one backward.

Runs on the CPU in seconds with a tiny randomly initialised Llama:

    python examples/drop_in_loss.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from altpo_kernels import altpo_loss, linear_logprobs, packed_hidden_states

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))

# Three sequences packed into one row: 0 = alternate answer, 1 = forget answer, 2 = retain row.
lengths = [12, 10, 14]
input_ids = torch.randint(0, 1000, (1, sum(lengths)))
seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
labels = torch.roll(input_ids[0], -1)                      # hidden[t] predicts token t + 1
labels[torch.cumsum(torch.tensor(lengths), 0) - 1] = -100  # no target past a sequence's end
labels[:4] = -100                                          # prompt tokens carry no loss

# Each sequence must attend to itself only. A plain model.model(input_ids, position_ids) forward
# does not guarantee that (with the default use_cache=True every sequence also sees the ones
# before it); packed_hidden_states isolates them whatever the attention implementation.
hidden = packed_hidden_states(model, input_ids[0], seq_lens=lengths)   # [N, H]
with torch.no_grad():  # the frozen reference: here the starting model itself, so delta starts at 0
    ref_seq = torch.zeros(3).index_add_(0, seq_ids, linear_logprobs(hidden, model.lm_head.weight, labels))
out = altpo_loss(hidden, model.lm_head.weight, labels, seq_ids,
                 win_seqs=torch.tensor([0]), lose_seqs=torch.tensor([1]), retain_seqs=torch.tensor([2]),
                 ref_win_logps=ref_seq[[0]], ref_lose_logps=ref_seq[[1]], beta=0.5, alpha=2.0)
out.loss.backward()
print(f"loss {out.loss.item():.4f} = forget {out.forget_loss.item():.4f} + 2 x retain {out.retain_loss.item():.4f}")
print(f"lm_head grad norm {model.lm_head.weight.grad.norm():.4f}; no [tokens, vocab] logits were kept")
