"""Smoke tests of the benchmark scripts: each runs end to end at its smallest CPU settings and writes its JSON.

They check the output's shape (keys, positive throughputs), not any speed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import `common` from their own folder

import bench_model  # noqa: E402
import bench_train  # noqa: E402


def test_bench_train_writes_results(tmp_path: Path) -> None:
    bench_train.main([
        "--device", "cpu", "--model", "tiny-ViT", "--batch-sizes", "2,4", "--warmup", "0", "--steps", "1",
        "--budget-s", "0.1", "--no-cpu-memory", "--out", str(tmp_path),
    ])
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
    assert (tmp_path / "bench_train.png").exists()


def test_bench_model_writes_results(tmp_path: Path) -> None:
    bench_model.main([
        "--device", "cpu", "--models", "tiny-ViT", "--batch-sizes", "2", "--warmup", "0", "--reps", "1",
        "--budget-s", "0.1", "--out", str(tmp_path),
    ])
    payload = json.loads((tmp_path / "bench_model.json").read_text())
    assert {"environment", "config", "rows"} <= payload.keys()
    assert {(r["model"], r["tower"], r["batch"]) for r in payload["rows"]} == {("tiny-ViT", t, 2) for t in ("image", "text")}
    for row in payload["rows"]:
        torch_result = row["results"]["torch"]
        assert torch_result["per_s"] > 0 and torch_result["ratio_vs_torch"] == 1.0
    assert (tmp_path / "bench_model.png").exists()
