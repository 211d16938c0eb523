"""Smoke tests of the benchmark scripts: each runs end to end at its smallest CPU settings and writes its JSON.

They check the output's shape (keys, positive throughputs), not any speed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import `common` from their own folder

import bench_model  # noqa: E402
import bench_train  # noqa: E402


def test_bench_train_writes_results(tmp_path: Path) -> None:
    bench_train.main(
        [
            "--device",
            "cpu",
            "--model",
            "tiny-ViT",
            "--batch-sizes",
            "2,4",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--budget-s",
            "0.1",
            "--no-cpu-memory",
            "--out",
            str(tmp_path),
        ]
    )
    payload = json.loads((tmp_path / "bench_train.json").read_text())
    assert {"environment", "config", "rows", "summary"} <= payload.keys()
    rows = payload["rows"]
    assert {(r["impl"], r["batch"]) for r in rows} == {(i, b) for i in ("baseline", "fastclip") for b in (2, 4)}
    assert all(r["status"] == "ok" and r["samples_per_s"] > 0 for r in rows)
    summary = payload["summary"]
    assert summary["largest_batch"] == {"baseline": 4, "fastclip": 4}
    assert set(summary["throughput_ratio"]) == {"2", "4"} and all(r > 0 for r in summary["throughput_ratio"].values())
    assert summary["largest_batch_target_met"] is None  # no sweep on a CPU: no out-of-memory to compare
    assert summary["max_first_loss_abs_diff"] < 1e-4  # same weights and inputs, fp32: the two losses agree
    # MFU: the same model FLOPs for both competitors at one batch, growing with it, over the measured rate
    flops = {(r["impl"], r["batch"]): r["model_flops"] for r in rows}
    assert flops["baseline", 2] == flops["fastclip", 2] and flops["baseline", 4] == flops["fastclip", 4]
    assert 0 < flops["baseline", 2] < flops["baseline", 4]
    rate = payload["matmul_tflops"]["fp32"] * 1e12
    for r in rows:
        assert r["mfu"] == pytest.approx(r["model_flops"] / (r["step"]["median_ms"] / 1e3) / rate)
    assert summary["fastclip_mfu"] == rows[-1]["mfu"] and summary["mfu_target_met"] is (rows[-1]["mfu"] >= 0.35)
    assert (tmp_path / "bench_train.png").exists()


def test_bench_model_writes_results(tmp_path: Path) -> None:
    bench_model.main(
        [
            "--device",
            "cpu",
            "--models",
            "tiny-ViT",
            "--batch-sizes",
            "2",
            "--warmup",
            "0",
            "--reps",
            "1",
            "--budget-s",
            "0.1",
            "--out",
            str(tmp_path),
        ]
    )
    payload = json.loads((tmp_path / "bench_model.json").read_text())
    assert {"environment", "config", "rows"} <= payload.keys()
    assert {(r["model"], r["tower"], r["batch"]) for r in payload["rows"]} == {
        ("tiny-ViT", t, 2) for t in ("image", "text")
    }
    for row in payload["rows"]:
        torch_result = row["results"]["torch"]
        assert torch_result["per_s"] > 0 and torch_result["ratio_vs_torch"] == 1.0
    assert (tmp_path / "bench_model.png").exists()


def test_bench_attention_writes_results(tmp_path: Path) -> None:
    import bench_attention

    bench_attention.main(["--device", "cpu", "--shapes", "vit_b32,text", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "attention_cpu.json").read_text())
    assert {"environment", "rows", "target_summary"} <= payload.keys()
    rows = {r["shape"]: r for r in payload["rows"]}
    assert set(rows) == {"vit_b32", "text"} and all(r["dtype"] == "fp32" for r in rows.values())
    # the model's packed call, with each backward path forced, and `attention` on the views
    fastclip = {"fastclip", "fastclip_fused", "fastclip_split", "fastclip_views"}
    assert {*fastclip, "sdpa", "sdpa_math"} <= rows["vit_b32"]["results"].keys()
    text = rows["text"]
    expected = {*fastclip, "fastclip_mask", "fastclip_dense", "sdpa", "sdpa_mask", "sdpa_mask_math"}
    assert expected <= text["results"].keys()
    assert len(text["lengths"]) == text["batch"] and all(2 <= n <= text["seq"] for n in text["lengths"])
    assert text["length_stats"]["mean"] == sum(text["lengths"]) / text["batch"]
    assert text["fwd_flops"] < text["dense_fwd_flops"]  # useful work: only the pairs inside each caption
    ran = [label for label, r in text["results"].items() if "skipped" not in r]
    assert {"fastclip_dense", "sdpa", "sdpa_mask", "sdpa_math"} <= set(ran)
    if bench_attention.HAS_LENGTHS:
        assert "fastclip" in ran and text["fwd_bwd_speedup_vs_best_sdpa"] > 0
    for row in rows.values():
        for label, result in row["results"].items():
            if "skipped" in result:
                assert result["skipped"], label  # a skipped competitor says why
            else:
                assert result["fwd_bwd"]["median_ms"] > 0 and result["max_abs_diff"] < 1e-4, (row["shape"], label)
    assert [t["shape"] for t in payload["target_summary"]] == list(bench_attention.TARGETS)
    assert all(t["met"] is None for t in payload["target_summary"])  # no target is judged on a CPU
    assert (tmp_path / "attention_cpu.png").exists()


def test_bench_loss_family_writes_results(tmp_path: Path, monkeypatch) -> None:
    import bench_loss

    monkeypatch.setattr(bench_loss, "matmul_rate_tflops", lambda device, dtype: 0.1)  # skip the 2048^3 reference matmul
    rc = bench_loss.main(
        [
            "--device",
            "cpu",
            "--loss",
            "siglip,supcon",
            "--dims",
            "64",
            "--sizes",
            "16,32",
            "--backends",
            "naive,torch,cpp",
            "--warmup",
            "0",
            "--reps",
            "1",
            "--budget-s",
            "0.1",
            "--no-cpu-memory",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0  # every competitor within tolerance of the float64 reference
    for loss, name, benchmark in (
        ("siglip", "bench_loss_siglip", "sigmoid_loss"),
        ("supcon", "bench_loss_supcon", "supcon_loss"),
    ):
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["benchmark"] == benchmark and payload["config"]["loss"] == loss
        assert {"environment", "config", "matmul_tflops", "points"} <= payload.keys()
        rows = payload["points"]
        assert {(r["loss"], r["backend"], r["n"]) for r in rows} == {
            (loss, b, n) for b in ("naive", "torch", "cpp") for n in (16, 32)
        }
        for row in rows:
            assert row["status"] == "ok" and row["check"]["ok"], row
            assert row["fwd"]["median_ms"] > 0 and row["fwd_bwd"]["tflops"] > 0
            assert row["fwd_bwd"]["timer"] == row["fwd"]["timer"] == "perf_counter, interleaved"
            if row["backend"] != "naive":
                assert row["fwd_bwd"]["speedup_vs_naive"] > 0
        assert (tmp_path / f"{name}.png").exists()
    assert not (tmp_path / "bench_loss.json").exists()  # CLIP's file only when clip is asked for
    target = json.loads((tmp_path / "bench_loss_siglip.json").read_text())["target"]
    assert target["met"] is None and target["fused_status"] is None  # its GPU point was not run


def test_bench_loss_check_fails_loudly(tmp_path: Path, monkeypatch) -> None:
    import bench_loss

    broken = bench_loss.SPECS["supcon"]._replace(fused=lambda b: lambda f: bench_loss.naive_supcon_loss(f) * 1.01)
    monkeypatch.setitem(bench_loss.SPECS, "supcon", broken)
    monkeypatch.setattr(bench_loss, "matmul_rate_tflops", lambda device, dtype: 0.1)
    rc = bench_loss.main(
        [
            "--device",
            "cpu",
            "--loss",
            "supcon",
            "--dims",
            "64",
            "--sizes",
            "32",
            "--backends",
            "naive,torch",
            "--warmup",
            "0",
            "--reps",
            "1",
            "--budget-s",
            "0.1",
            "--no-cpu-memory",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 1
    rows = json.loads((tmp_path / "bench_loss_supcon.json").read_text())["points"]
    assert [r["check"]["ok"] for r in rows] == [True, False]


def test_time_interleaved_rotates_the_order_and_times_each_call() -> None:
    """One untimed round, then `warmup + reps` rounds that each call every function once, starting with a
    different one each round; each result holds that function's own timed calls."""
    import time

    import common

    calls: list[str] = []

    def sleeper(name: str, seconds: float):
        def call() -> None:
            calls.append(name)
            time.sleep(seconds)

        return call

    fns = {"a": sleeper("a", 0.002), "b": sleeper("b", 0.012), "c": sleeper("c", 0.0)}
    result = common.time_interleaved(fns, warmup=1, reps=3)
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert rounds == [list("abc"), list("abc"), list("bca"), list("cab"), list("abc")]
    assert result.keys() == fns.keys() and all(r["reps"] == 3 for r in result.values())
    assert result["c"]["median_ms"] < result["a"]["median_ms"] < result["b"]["median_ms"]
    assert 12 <= result["b"]["min_ms"] <= result["b"]["median_ms"]  # a sleep lasts at least as long as asked
    assert common.time_interleaved({}) == {}


def test_time_interleaved_budget_cuts_slow_rounds_to_min_reps() -> None:
    import common

    calls: list[int] = []
    result = common.time_interleaved({"x": lambda: calls.append(1)}, warmup=5, reps=100, budget_s=0.0, min_reps=3)
    assert result["x"]["reps"] == 3 and len(calls) == 1 + 3  # the estimate, then min_reps timed, no warm-up
