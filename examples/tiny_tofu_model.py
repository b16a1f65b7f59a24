"""Make a tiny Llama that knows some TOFU answers, for trying ``altpo-fast train`` on a CPU.

It trains a byte-level BPE tokenizer (with the Llama-3 chat template) on the rows it will see,
builds a 2-layer Llama, and fine-tunes it on the forget split plus the first retain rows, so that
AltPO has memorised answers to unlearn. The result is a save_pretrained folder:

    python examples/tiny_tofu_model.py --data fixtures/tofu --output runs/tiny-tofu-model

With ``--finetune-epochs 0`` the weights stay random (seconds instead of minutes: enough to try
the command line, not to see forgetting).
"""

from __future__ import annotations

import argparse
import sys
import time

from altpo.data.tofu import load_alternates, load_tofu_split, texts_for_tokenizer
from altpo.errors import UserError
from altpo.model.tiny_llama import build_tiny_llama, build_tiny_tokenizer, save_tiny_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of TOFU JSON Lines splits (fixtures/tofu in this repository)")
    parser.add_argument("--forget-split", default="forget01", help="forget split (default forget01)")
    parser.add_argument("--retain-split", default="retain99", help="retain split (default retain99)")
    parser.add_argument("--retain-rows", type=int, default=200,
                        help="first N retain rows to learn, as --max-retain-rows will use (default 200)")
    parser.add_argument("--alternates", default=None,
                        help="alternates file: its texts join the tokenizer's training text")
    parser.add_argument("--finetune-epochs", type=int, default=40,
                        help="epochs of answer-token fine-tuning (default 40; 0: random weights)")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--output", required=True, help="folder to write the model and tokenizer to")
    args = parser.parse_args(argv)

    try:
        forget = load_tofu_split(args.data, args.forget_split)
        retain = load_tofu_split(args.data, args.retain_split)[: args.retain_rows]
        alternates = load_alternates(args.alternates, forget) if args.alternates else []
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = build_tiny_tokenizer(texts_for_tokenizer(forget + retain, alternates), vocab_size=1024)
    model = build_tiny_llama(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers,
                             num_heads=4, num_kv_heads=2, intermediate_size=2 * args.hidden_size)
    if args.finetune_epochs > 0:
        from altpo.model.tiny_finetune import finetune_qa

        t0 = time.perf_counter()
        result = finetune_qa(model, tokenizer, forget + retain, epochs=args.finetune_epochs,
                             batch_size=16, lr=3e-3)
        print(f"fine-tuned on {len(forget) + len(retain)} rows: answer NLL "
              f"{result.step_losses[0]:.3f} -> {result.step_losses[-1]:.3f} "
              f"in {time.perf_counter() - t0:.0f} s")
    save_tiny_model(model, tokenizer, args.output)
    print(f"tiny model written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
