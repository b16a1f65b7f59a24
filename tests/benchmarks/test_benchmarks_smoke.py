"""Each benchmark's CPU ``--quick`` mode runs once; its output is checked against facts the test
knows on its own (not timed: the numbers of a --quick run are not performance claims).

- Ratios: each printed ratio equals the two printed times divided, read back from the benchmark's
  own printed table (so the table, the ratio line and the JSON cannot drift apart).
- Sizes: the tiny Llama's parameter count is counted here from its shape; the materialised path's
  memory is held to the bytes of its [N, V] fp32 tensors, counted here.
- Values: every variant's loss (ours, TRL's, cut-cross-entropy's, the materialised path) is held
  to a float64 recomputation written in this file from docs/design.md section 2, on the inputs the
  benchmark drew.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from paths import REPO_ROOT

ROOT = REPO_ROOT
MiB = 2**20


def _run(args: list[str], out: Path, timeout: int = 900) -> tuple[dict, str]:
    """The benchmark's JSON and what it printed on stdout. (The kernels' quick run takes about a
    minute on an idle 2-core machine and passed 300 s when other jobs shared the cores.)"""
    res = subprocess.run([sys.executable, *args, "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return json.loads(out.read_text()), res.stdout


def _printed_table(stdout: str, first_header: str) -> list[dict]:
    """Rows of a printed table (header line starting with ``first_header``, then a dashes line)."""
    lines = stdout.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(first_header))
    header = re.split(r"\s{2,}", lines[i].strip())
    rows = []
    for line in lines[i + 2:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) < len(header) - 1 or not line.strip():
            break
        rows.append(dict(zip(header, cells)))
    return rows


def _close_after_rounding(printed: float, exact: float, digits_rel: float, abs_tol: float = 0.0) -> bool:
    return abs(printed - exact) <= digits_rel * abs(exact) + abs_tol


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def step_run(outputs):
    # one timed step, no warm-up: the smoke run checks the recipes, not their speed
    return _run(["-m", "benchmarks.step", "--quick", "--steps", "1", "--warmup", "0"], outputs / "s.json")


@pytest.fixture(scope="module")
def kernels_run(outputs):
    # a smaller memory-ratio shape than the default 4096x256x32000, for CI time
    return _run(["-m", "benchmarks.kernels", "--quick", "--budget", "0.02", "--ratio-shape", "1024,128,8000"],
                outputs / "k.json")


def _tiny_llama_parameters() -> int:
    """The --quick model's weights counted from its shape (V=8192, H=64, I=128, 2 layers, 4 query
    heads and 2 key/value heads of 16, tied embeddings): embeddings, per layer q/k/v/o, gate/up/down
    and two RMSNorm weights, then the final norm."""
    v, h, i, layers, q_heads, kv_heads, head = 8192, 64, 128, 2, 4, 2, 16
    per_layer = (h * q_heads * head + 2 * h * kv_heads * head + q_heads * head * h  # attention
                 + 3 * h * i                                                        # MLP
                 + 2 * h)                                                           # norms
    return v * h + layers * per_layer + h


def test_step_quick_compares_three_recipes(step_run):
    step_json, stdout = step_run
    rows = {r["variant"]: r for r in step_json["rows"]}
    assert set(rows) == {"altpo-fast", "open-unlearning", "trl-style"}
    params = _tiny_llama_parameters()
    w = step_json["workload"]
    assert w["forget_rows"] == 32 and w["retain_rows"] == 32
    for r in rows.values():
        assert r["status"] == "ok", r.get("traceback", r["status"])
        assert r["attempts"] == 1
        assert r["params"] == params == 598_336
        # a recipe executes at least the forward and backward of every real token once
        assert r["executed_policy_tokens"] > 0
        assert r["executed_flops_per_step"] >= 6 * params * min(r["executed_policy_tokens"], w["workload_tokens"])
        # no recipe runs faster than the dense matmuls it is made of
        assert 0 < r["mfu"] < 1
        # the seed run is 310 steps (docs/design.md section 2.4), plus any reference pass
        assert r["seed_run_estimate_s"] >= 310 * r["step_s"]
    # packing sends fewer tokens through the policy than the padded recipes, which also repeat
    # each forget answer per alternate
    assert rows["altpo-fast"]["packed_policy_tokens"] < w["workload_tokens"]
    assert rows["open-unlearning"]["padded_policy_tokens"] >= w["workload_tokens"]
    # only the resident-reference recipe has no separate reference pass
    assert rows["open-unlearning"]["reference_pass"] is None
    assert rows["altpo-fast"]["reference_pass"]["seed_run_s"] > 0

    # what the benchmark printed: the table's times, its tokens/s, and the ratio lines
    printed = {r["variant"]: r for r in _printed_table(stdout, "variant")}
    assert set(printed) == set(rows)
    tokens = int(re.search(r"(\d+) workload tokens", stdout).group(1))
    assert tokens == w["workload_tokens"]
    for name, p in printed.items():
        step_s, per_s = float(p["step s"]), float(p["tokens/s"])
        # tokens/s x seconds = the workload's tokens (3 and 4 significant digits printed)
        assert _close_after_rounding(per_s * step_s, tokens, 0.01), (name, per_s, step_s, tokens)
        assert _close_after_rounding(step_s, rows[name]["step_s"], 0.005)
    ratio_lines = re.findall(r"^([\w-]+): ([\d.]+)x altpo-fast's step time", stdout, re.M)
    assert {name for name, _ in ratio_lines} == {"open-unlearning", "trl-style"}
    fast = float(printed["altpo-fast"]["step s"])
    for name, ratio in ratio_lines:
        # a 2-decimal ratio of two 3-digit times: within the two roundings
        exact = float(printed[name]["step s"]) / fast
        assert _close_after_rounding(float(ratio), exact, 0.011, 0.005), (name, ratio, exact)


# ----------------------------------------------------------------------------------------------
# the kernel benchmark: values against a float64 recomputation written here


BETA, ALPHA, GAMMA = 0.5, 2.0, 1.0  # the kernel benchmark's settings (its docstring and JSON)


def _float64_values(n: int, h: int, v: int) -> dict[str, float]:
    """Both ops' values in float64 on the benchmark's inputs, from docs/design.md section 2."""
    from benchmarks.kernels import make_inputs  # the input generator only, not the code under test

    x = make_inputs(n, h, v, torch.float32, torch.device("cpu"))
    hidden, weight = x["hidden"].detach().double(), x["weight"].detach().double()
    token_logp = torch.log_softmax(hidden @ weight.T, dim=-1)[torch.arange(n), x["labels"]]
    linear = float((token_logp * x["token_weights"].double()).sum())
    seq = [float(token_logp[x["seq_ids"] == s].sum()) for s in range(x["num_seqs"])]
    win, lose, retain = x["win"].tolist(), x["lose"].tolist(), x["retain"].tolist()
    ref_win, ref_lose = x["ref_win"].double().tolist(), x["ref_lose"].double().tolist()
    deltas = torch.tensor([(seq[a] - rw) - (seq[b] - rl)
                           for a, b, rw, rl in zip(win, lose, ref_win, ref_lose)], dtype=torch.float64)
    forget = float(-(2 / BETA) * torch.nn.functional.logsigmoid(BETA * deltas).mean())
    retain_tokens = sum(int((x["seq_ids"] == s).sum()) for s in retain)
    retain_nll = -sum(seq[s] for s in retain) / retain_tokens
    return {"linear_logprobs": linear, "altpo_loss": GAMMA * forget + ALPHA * retain_nll}


def test_kernels_quick_values_match_float64_recomputed_here(kernels_run):
    kernels_json, _ = kernels_run
    ok = [r for r in kernels_json["results"] if r["status"] == "ok" and r["pass"] == "full"]
    # the peers measured on the CPU too: TRL's fused head and cut-cross-entropy's torch impl
    assert {"materialised", "altpo-torch", "reference", "trl", "cce"} <= {r["variant"] for r in ok}
    peers = kernels_json["meta"]["peers"]
    assert peers["trl"] and peers["cut-cross-entropy"], peers
    assert "liger-kernel" in peers
    expected = {}
    for r in ok:
        key = (r["n"], r["h"], r["v"])
        if key not in expected:
            expected[key] = _float64_values(*key)
        want = expected[key][r["op"]]
        # fp32 inputs, fp32 accumulation: every variant within 1e-4 of the float64 value
        assert r["value"] == pytest.approx(want, rel=1e-4, abs=1e-6), (r["variant"], r["op"], key)
        # the benchmark's own float64 reference, rounded to fp32 on its way out
        assert r["reference_value"] == pytest.approx(want, rel=1e-6), (r["op"], key)
        assert r["check"] == "ok", r
        assert r["median_ms"] > 0
    assert len(expected) == 2  # both quick shapes


def test_kernels_quick_ratios_match_the_printed_times(kernels_run):
    kernels_json, stdout = kernels_run
    table = _printed_table(stdout, "op")
    checked = 0
    for op in ("linear_logprobs", "altpo_loss"):
        for n in {int(r["N"]) for r in table}:
            here = {r["variant"]: r for r in table if r["op"] == op and int(r["N"]) == n and r["pass"] == "full"}
            if "altpo-torch" not in here or "materialised" not in here:
                continue
            ours = float(here["altpo-torch"]["ms"])
            # "x <peer>" = the peer's time / ours, each printed to 3 significant digits
            for peer, column in (("materialised", "x materialised"), ("trl", "x trl"), ("cce", "x cce")):
                printed = float(here["altpo-torch"][column])
                exact = float(here[peer]["ms"]) / ours
                assert _close_after_rounding(printed, exact, 0.011, 0.005), (op, n, peer, printed, exact)
                checked += 1
    assert checked == 2 * 2 * 3  # two ops, two quick shapes, three peers
    # at the larger quick shape the chunked path holds less than the [N, V] logits path
    big = max(r["n"] for r in kernels_json["ratios"])
    assert next(r for r in kernels_json["ratios"] if r["n"] == big and r["variant"] == "altpo-torch"
                and r["pass"] == "full" and r["op"] == "linear_logprobs")["memory_vs_materialised"] < 1.0


def test_kernels_quick_memory_ratio_against_counted_bytes(kernels_run):
    kernels_json, stdout = kernels_run
    mr = kernels_json["memory_ratio"]
    n, h, v = mr["shape"]
    assert (n, h, v) == (1024, 128, 8000)
    # materialised holds fp32 logits, their log-softmax and its gradient: 3 x N x V x 4 bytes
    assert mr["materialised_mib"] * MiB > 0.9 * 3 * n * v * 4
    # the chunked path holds its outputs dW (V x H) and dH (N x H) in fp32, and well under the
    # materialised path's three [N, V] fp32 tensors
    assert (v * h + n * h) * 4 * 0.9 < mr["altpo_torch_mib"] * MiB < 0.8 * 3 * n * v * 4
    ratio = float(re.search(r"= ([\d.]+); gradients agree", stdout).group(1))
    assert _close_after_rounding(ratio, mr["altpo_torch_mib"] / mr["materialised_mib"], 0.0, 0.0005)
    # the two gradients were compared element by element, not by a sum
    ga = mr["gradient_agreement"]
    assert mr["gradients_agree"] and ga["agree"]
    assert ga["dh_max_rel_err"] <= 2e-4 and ga["dw_max_rel_err"] <= 2e-4
    assert "materialised-compile" in kernels_json["absent"]  # the note of what did not run


def test_gradient_comparison_catches_one_wrong_element():
    from benchmarks.kernels import compare_gradients

    gen = torch.Generator().manual_seed(5)
    want = {"dh": torch.randn(64, 32, generator=gen), "dw": torch.randn(128, 32, generator=gen)}
    same = {k: t.clone() for k, t in want.items()}
    assert compare_gradients(same, want)["agree"]
    # rounding-sized noise everywhere passes
    noisy = {k: t * (1 + 1e-6 * torch.randn(t.shape, generator=gen)) for k, t in want.items()}
    assert compare_gradients(noisy, want)["agree"]
    for name, index in (("dh", (3, 7)), ("dw", (100, 0))):
        wrong = {k: t.clone() for k, t in want.items()}
        wrong[name][index] = -wrong[name][index]  # one sign flipped: sums of |g| are unchanged
        assert wrong[name].abs().sum() == want[name].abs().sum()
        got = compare_gradients(wrong, want)
        assert not got["agree"], got
        assert tuple(got[f"{name}_worst_index"]) == index
        assert got[f"{name}_max_abs_err"] == pytest.approx(2 * abs(float(want[name][index])))
    # one element off by 1% of itself fails too; a NaN fails; a wrong shape fails
    wrong = {k: t.clone() for k, t in want.items()}
    wrong["dw"][5, 5] *= 1.01
    assert not compare_gradients(wrong, want)["agree"]
    wrong["dw"][5, 5] = float("nan")
    assert not compare_gradients(wrong, want)["agree"]
    assert not compare_gradients({"dh": want["dh"][:-1], "dw": want["dw"]}, want)["agree"]


def test_compile_report_quick(outputs):
    report, _ = _run(["-m", "benchmarks.compile_report", "--quick"], outputs / "c.json")
    assert report["rows"] and all(r["arch"] == "sm_90" for r in report["rows"])
    for r in report["rows"]:
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] >= 0
    spilled = {f"{r['arch']} {r['kernel']}" for r in report["rows"] if r["spill_stores"] or r["spill_loads"]}
    assert spilled == {p.split(":")[0] for p in report["problems"] if "spills" in p}
    assert set(report["sm90_wgmma"]) <= {r["kernel"] for r in report["rows"]}


def test_report_combines_results(outputs, step_run, kernels_run):
    res = subprocess.run([sys.executable, "-m", "benchmarks.report", "--kernels", str(outputs / "k.json"),
                          "--step", str(outputs / "s.json"), "--out-dir", str(outputs / "results")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name for p in (outputs / "results").iterdir())
    stem = Path(names[0]).stem
    assert stem.endswith("-cpu-quick") and names == [f"{stem}.json", f"{stem}.md", f"{stem}.png"]
    md = (outputs / "results" / f"{stem}.md").read_text()
    assert "not a performance result" in md
    for variant in ("altpo-fast", "open-unlearning", "trl-style", "altpo-torch", "materialised"):
        assert variant in md
    assert (outputs / "results" / f"{stem}.png").stat().st_size > 10_000


def test_length_table_is_consistent():
    table = json.loads((ROOT / "benchmarks" / "tofu_lengths.json").read_text())
    forget, alt, retain = table["forget10"], table["alternates"], table["retain90"]
    assert len(forget["prompt"]) == len(forget["answer"]) == 400
    assert len(retain["prompt"]) == len(retain["answer"]) == 3600
    assert len(alt["answer"]) == len(alt["question_index"]) == 2000
    # five alternates per forget question
    assert sorted(alt["question_index"]) == sorted(list(range(400)) * 5)
    seqs = [forget["prompt"][q] + a for q, a in zip(alt["question_index"], alt["answer"])]
    stats = table["stats"]["alternate_sequence"]
    assert stats["mean"] == pytest.approx(statistics.fmean(seqs), abs=0.01)
    assert (stats["min"], stats["max"]) == (min(seqs), max(seqs))
    # every prompt holds the fixed template (system block with date, headers) plus the question
    assert min(forget["prompt"] + retain["prompt"]) > 30
    assert min(forget["answer"] + retain["answer"] + alt["answer"]) >= 2  # text + <|eot_id|>


def test_packed_vs_padded_fails_on_a_row_that_did_not_measure():
    from benchmarks.packed_vs_padded import failures

    ok = {"workload": "tofu", "mode": "packed", "tokens_per_s": 10.0}
    assert failures([ok]) == []
    assert failures([ok, {"workload": "tofu", "mode": "padded", "error": "out of memory"}]) == \
        ["tofu padded: out of memory"]
    assert failures([{"workload": "tofu", "mode": "packed"}]) == ["tofu packed: no measurement"]


def test_band_sweep_quick(outputs):
    """--band-sweep runs every band and the default side by side, agrees with the default band's
    gradients, and names the best with its workspace."""
    sweep, _ = _run(["-m", "benchmarks.kernels", "--band-sweep", "--quick"], outputs / "b.json")
    (r,) = sweep["results"]
    bands = [row["vocab_band"] for row in r["rows"]]
    assert {256, 512, 1024} <= set(bands) and r["default_band"] in bands
    assert all(row["rel_diff_vs_default"] < 1e-5 and row["median_ms"] > 0 for row in r["rows"])
    best = min(r["rows"], key=lambda row: row["median_ms"])
    assert r["best_band"] == best["vocab_band"] and r["best_workspace_mib"] == best["workspace_mib"]
    assert r["default_over_best"] >= 1.0
