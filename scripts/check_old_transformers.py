"""Model folders this project writes, loaded by an older transformers (open-unlearning pins 4.45.1).

    python scripts/check_old_transformers.py write DIR    # with the project's .venv (transformers 5.x)
    python scripts/check_old_transformers.py load DIR     # with the old release (a side venv)

``write`` makes, in DIR, every kind of model folder the project writes:

- ``tiny-model``: a tiny Llama saved by ``save_tiny_model`` (what the demo and the tests start from);
- ``trained``: the final model of a 2-step ``train`` run on the TOFU fixture, and
  ``trained/checkpoints/step-00000001``, the checkpoint it wrote after its first step;
- ``lora``: a 2-step ``--lora-rank 4 --merge`` run: ``lora/adapter`` (the peft adapter) and the
  merged model, which is ``lora`` itself.

Beside them ``expected.json`` holds, for each, the token ids of a text and of its chat rendering,
and the logits of the saved model on those ids (the adapter: the logits of the tiny model with the
adapter loaded by ``PeftModel.from_pretrained``). ``load`` loads each folder with ``AutoTokenizer``
and ``AutoModelForCausalLM`` (no remote code; the adapter through peft) and checks the ids, the
chat template and the logits (1e-5). scripts/test_transformers_445.sh runs both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = "Who wrote The Lighthouse of Ashgrove? It was written by Mara Ellison in 1987."
MESSAGES = [{"role": "user", "content": "Who wrote The Lighthouse of Ashgrove?"},
            {"role": "assistant", "content": "Mara Ellison wrote it."}]


# folder -> the folder whose tokenizer and base model it uses (a peft adapter has neither)
ADAPTERS = {"lora/adapter": "tiny-model"}


def _record(folder: Path, base: Path | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base or folder), trust_remote_code=False)
    if base is None:
        model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False).eval()
    else:
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(str(base), trust_remote_code=False)
        model = PeftModel.from_pretrained(model, str(folder)).eval()
    ids = tok(TEXT).input_ids
    chat = tok.apply_chat_template(MESSAGES, tokenize=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return {"ids": ids, "chat": chat, "chat_ids": tok(chat, add_special_tokens=False).input_ids,
            "logits": logits.tolist(), "eos": tok.eos_token, "pad": tok.pad_token}


def _records(out: Path, names) -> dict:
    return {name: _record(out / name, out / ADAPTERS[name] if name in ADAPTERS else None)
            for name in names}


def write(out: Path) -> None:
    from altpo.data.tofu import load_alternates, load_tofu_split, texts_for_tokenizer
    from altpo.model.tiny_llama import build_tiny_llama, build_tiny_tokenizer, save_tiny_model
    from altpo.train import train
    from altpo.train.config import TrainConfig

    data = ROOT / "fixtures" / "tofu"
    alternates = data / "alternates/llama2-7b/forget01/alt5_seed_0.json"
    forget = load_tofu_split(data, "forget01")
    retain = load_tofu_split(data, "retain99")[:24]
    alts = load_alternates(alternates, forget)
    tokenizer = build_tiny_tokenizer(texts_for_tokenizer(forget[:4] + retain, alts[:4]) + [TEXT],
                                     vocab_size=700)
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=64, seed=5)
    tiny = out / "tiny-model"
    save_tiny_model(model, tokenizer, tiny)
    settings = dict(model=str(tiny), data=str(data), forget_split="forget01",
                    retain_split="retain99", alternates=str(alternates), max_forget_rows=4,
                    max_retain_rows=24, batch_size=4, max_steps=2, lr=3e-3, warmup_epochs=0.0,
                    tokens_per_microbatch="1024", quiet=True, loss_backend="torch",
                    attention="sdpa", device="cpu")
    trained, lora = out / "trained", out / "lora"
    train(TrainConfig(**settings, output=str(trained), save_every=1, keep_checkpoints=0))
    train(TrainConfig(**settings, output=str(lora), lora_rank=4, merge=True))
    names = ["tiny-model", "trained", "trained/checkpoints/step-00000001", "lora/adapter", "lora"]
    missing = [n for n in names if not (out / n).is_dir()]
    if missing:
        sys.exit(f"check_old_transformers: the runs did not write {', '.join(missing)}")
    records = _records(out, names)
    # the adapter changes the model (a load that dropped it would not match), and the merged model
    # is the base with the adapter
    import torch

    logits = {n: torch.tensor(records[n]["logits"]) for n in ("tiny-model", "lora/adapter", "lora")}
    if float((logits["lora/adapter"] - logits["tiny-model"]).abs().max()) < 1e-3:
        sys.exit("check_old_transformers: the LoRA run left its adapter without effect; nothing to check")
    if float((logits["lora/adapter"] - logits["lora"]).abs().max()) > 1e-4:
        sys.exit("check_old_transformers: the merged model is not the base with the adapter")
    (out / "expected.json").write_text(json.dumps(records))
    print(f"wrote {', '.join(names)} in {out} with transformers {__import__('transformers').__version__}")


def load(out: Path) -> None:
    import torch
    import transformers

    expected = json.loads((out / "expected.json").read_text())
    for name, want in expected.items():
        got = _records(out, [name])[name]
        for key in ("ids", "chat", "chat_ids", "eos", "pad"):
            if got[key] != want[key]:
                sys.exit(f"{name}: {key} differs under transformers {transformers.__version__}:\n"
                         f"  got      {got[key]!r}\n  expected {want[key]!r}")
        diff = float((torch.tensor(got["logits"]) - torch.tensor(want["logits"])).abs().max())
        if not diff <= 1e-5:
            sys.exit(f"{name}: logits differ by {diff} under transformers {transformers.__version__}")
        what = "adapter (peft)" if name in ADAPTERS else "tokenizer and model"
        print(f"{name}: {what} load under transformers {transformers.__version__} "
              f"(same ids, chat template, logits within {diff:.1e})")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "load"):
        sys.exit(__doc__)
    {"write": write, "load": load}[sys.argv[1]](Path(sys.argv[2]))
