"""Optimizer step with host-memory states: ``--offload-update cpu`` against ``stream``, and the
on-device optimizer, side by side on the same bf16 parameters and gradients.

Three optimizers over the same random bf16 parameters (a Llama-shaped set of tensors scaled by
``--params``), each timed over full ``step`` calls (clipping, update, write-back):

``device``   MixedPrecisionAdamW, fp32 master weights and moments beside the weights
``cpu``      OffloadedAdamW, update on the host: gradient to the host, AdamW there, weight back
``stream``   OffloadedAdamW, states streamed chunk by chunk to the device, updated, streamed back

On a CPU-only machine "device" and "host" are the same memory, so the numbers measure the extra
copies and the arithmetic of each placement, not PCIe transfers; on a GPU the same script measures
the real thing.

    python -m benchmarks.optimizer_offload --params 50e6          # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.exit("run it as a module from the repository root: python -m benchmarks.optimizer_offload --help")

import torch

from altpo.train.master_weights import MixedPrecisionAdamW
from altpo.train.optimizer_offload import OffloadedAdamW
from benchmarks.common import pick_device, run_metadata, time_fn


def make_params(total: float, device, seed: int = 0):
    """Tensors of a Llama layer's proportions (hidden h, MLP 3.5h) adding up to about ``total``."""
    h = 64
    while 12 * (h * 2) ** 2 <= total:  # one layer with hidden h has ~ 4h^2 + 3*3.5h^2 = 14.5 h^2
        h *= 2
    shapes, n = [], 0
    while n < total:
        for s in ((h, h), (h // 4, h), (h // 4, h), (h, h), (7 * h // 2, h), (7 * h // 2, h), (h, 7 * h // 2), (h,)):
            shapes.append(s)
            n += torch.Size(s).numel()
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device, torch.bfloat16)) for s in shapes]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=50e6, help="parameters in all (default 50e6)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    params = make_params(args.params, device)
    numel = sum(p.numel() for p in params)
    grads = [torch.randn_like(p) for p in params]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    kw = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    optimizers = {
        "device": MixedPrecisionAdamW(named, master_weights="fp32", **kw),
        "cpu": OffloadedAdamW(named, update="cpu", **kw),
        "stream": OffloadedAdamW(named, update="stream", **kw),
    }

    def setup():
        for p, g in zip(params, grads):
            p.grad = g.clone()

    results = {}
    for name, opt in optimizers.items():
        t = time_fn(lambda opt=opt: opt.step(1e-5, 1.0), device, setup=setup, warmup=1,
                    min_reps=3, budget_s=5.0)
        results[name] = {**t, "ns_per_param": t["median_ms"] * 1e6 / numel}
    base = results["device"]["median_ms"]
    print(f"optimizer step, {numel / 1e6:.1f}M bf16 parameters on {device} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'update':<8} {'ms/step':>10} {'ns/param':>10} {'vs device':>10}")
    for name, r in results.items():
        print(f"{name:<8} {r['median_ms']:>10.1f} {r['ns_per_param']:>10.2f} "
              f"{r['median_ms'] / base:>9.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": run_metadata(device), "parameters": numel,
                                              "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
