"""Each benchmark's CPU ``--quick`` mode runs once and writes JSON with its ratios (not timed).

The numbers of a --quick run are not performance claims; what is checked is that every variant
ran, that the values and gradients each variant computed agree with the float64 reference (the
benchmark itself compares them), and that the ratios the README reports are there and sane.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from paths import REPO_ROOT

ROOT = REPO_ROOT


def _run(args: list[str], out: Path, timeout: int = 300) -> dict:
    res = subprocess.run([sys.executable, *args, "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def step_json(outputs):
    # one timed step, no warm-up: the smoke run checks the recipes, not their speed
    return _run(["-m", "benchmarks.step", "--quick", "--steps", "1", "--warmup", "0"], outputs / "s.json")


@pytest.fixture(scope="module")
def kernels_json(outputs):
    # a smaller memory-ratio shape than the default 4096x256x32000, for CI time
    return _run(["-m", "benchmarks.kernels", "--quick", "--budget", "0.02", "--ratio-shape", "1024,128,8000"],
                outputs / "k.json")


def test_step_quick_compares_three_recipes(step_json):
    rows = {r["variant"]: r for r in step_json["rows"]}
    assert set(rows) == {"altpo-fast", "open-unlearning", "trl-style"}
    for r in rows.values():
        assert r["status"] == "ok", r.get("traceback", r["status"])
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"]
        # MFU from the tokens each recipe executes (padding and in-step reference passes included)
        assert r["mfu"] == pytest.approx(r["executed_flops_per_step"] / r["step_s"]
                                         / (step_json["matmul"]["tflops"] * 1e12), rel=1e-9)
        assert r["executed_flops_per_step"] >= 6 * r["params"] * r["executed_policy_tokens"]
        assert r["attempts"] == 1
        assert r["seed_run_estimate_s"] >= 310 * r["step_s"]
    w = step_json["workload"]
    assert w["forget_rows"] == 32 and w["retain_rows"] == 32
    # tokens/s is the same workload over each variant's own step time
    for r in rows.values():
        assert r["tokens_per_s"] == pytest.approx(w["workload_tokens"] / r["step_s"], rel=1e-9)
    # packing sends fewer tokens through the policy than the padded recipes, which also repeat
    # each forget answer per alternate
    assert rows["altpo-fast"]["packed_policy_tokens"] < w["workload_tokens"]
    assert rows["open-unlearning"]["padded_policy_tokens"] >= w["workload_tokens"]
    # only the resident-reference recipe has no separate reference pass
    assert rows["open-unlearning"]["reference_pass"] is None
    assert rows["altpo-fast"]["reference_pass"]["seed_run_s"] > 0
    ratios = {r["baseline"]: r for r in step_json["ratios"]}
    assert set(ratios) == {"open-unlearning", "trl-style"}
    for name, r in ratios.items():
        assert r["step_time_vs_altpo_fast"] == pytest.approx(rows[name]["step_s"] / rows["altpo-fast"]["step_s"])
        assert r["peak_memory_vs_altpo_fast"] > 0 and r["seed_run_vs_altpo_fast"] > 0


def test_kernels_quick_checks_every_variant_and_reports_ratios(kernels_json):
    ok = [r for r in kernels_json["results"] if r["status"] == "ok"]
    ran = {r["variant"] for r in ok}
    # the peers measured on the CPU too: TRL's fused head and cut-cross-entropy's torch impl
    assert {"materialised", "altpo-torch", "reference", "trl", "cce"} <= ran
    for r in ok:
        # every variant's memory measured the same way: peak above the inputs
        if r["pass"] == "full":
            assert r["workspace_mib"] == pytest.approx(r["peak_mib"]) and r["peak_mib"] > 0, r
    peers = kernels_json["meta"]["peers"]
    assert peers["trl"] and peers["cut-cross-entropy"], peers
    assert "liger-kernel" in peers
    for r in ok:
        # each variant's value, dH and dW were compared with float64 inside the benchmark
        assert r["check"] == "ok", r
        assert max(r["err_value"], r["err_dh"], r["err_dw"]) < 1e-3
        assert r["median_ms"] > 0 and r["tflops"] > 0
    ratios = [r for r in kernels_json["ratios"] if r["variant"] == "altpo-torch" and r["pass"] == "full"]
    assert ratios and all(r["speedup_vs_materialised"] > 0 for r in ratios)
    assert all(r["speedup_vs_trl"] > 0 and r["speedup_vs_cce"] > 0 for r in ratios)
    # at the larger quick shape the chunked path holds less than the [N, V] logits path
    big = max(r["n"] for r in ratios)
    assert next(r for r in ratios if r["n"] == big)["memory_vs_materialised"] < 1.0
    mr = kernels_json["memory_ratio"]
    assert mr["gradients_agree"]
    assert mr["ratio"] == pytest.approx(mr["altpo_torch_mib"] / mr["materialised_mib"])
    # materialised holds fp32 logits, their log-softmax and its gradient: 3 x 1024 x 8000 x 4 B
    assert mr["materialised_mib"] > 3 * 1024 * 8000 * 4 / 2**20 * 0.9
    assert mr["ratio"] < 0.8
    assert "materialised-compile" in kernels_json["absent"]  # the note of what did not run


def test_compile_report_quick(outputs):
    report = _run(["-m", "benchmarks.compile_report", "--quick"], outputs / "c.json")
    assert report["rows"] and all(r["arch"] == "sm_90" for r in report["rows"])
    for r in report["rows"]:
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] >= 0
    spilled = {f"{r['arch']} {r['kernel']}" for r in report["rows"] if r["spill_stores"] or r["spill_loads"]}
    assert spilled == {p.split(":")[0] for p in report["problems"] if "spills" in p}
    assert set(report["sm90_wgmma"]) <= {r["kernel"] for r in report["rows"]}


def test_report_combines_results(outputs, step_json, kernels_json):
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
    sweep = _run(["-m", "benchmarks.kernels", "--band-sweep", "--quick"], outputs / "b.json")
    (r,) = sweep["results"]
    bands = [row["vocab_band"] for row in r["rows"]]
    assert {256, 512, 1024} <= set(bands) and r["default_band"] in bands
    assert all(row["rel_diff_vs_default"] < 1e-5 and row["median_ms"] > 0 for row in r["rows"])
    best = min(r["rows"], key=lambda row: row["median_ms"])
    assert r["best_band"] == best["vocab_band"] and r["best_workspace_mib"] == best["workspace_mib"]
    assert r["default_over_best"] >= 1.0
