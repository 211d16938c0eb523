"""tools/results_table.py: the README's GPU results block, rendered from benchmark JSON.

The fixtures follow the schemas the benchmark scripts write (figures copied from a real H200 run of
bench_loss.py); no GPU is needed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "results_table.py"
_spec = importlib.util.spec_from_file_location("results_table", SCRIPT)
results_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_table)

ENVIRONMENT = {
    "timestamp_utc": "2026-12-01T00:22:25+00:00",
    "device": "NVIDIA H200",
    "gpu_driver": "580.159.04",
    "torch": "2.11.0+cu130",
    "torch_cuda": "13.0",
    "triton": "3.6.0",
    "git_commit": "cbb9492036fc8ed0f0985402eadf1ebeba42c6de",
    "git_dirty": True,
}


def timing(median_ms: float, **extra: float) -> dict:
    return {"median_ms": median_ms, "min_ms": median_ms * 0.99, "reps": 20, "timer": "triton.do_bench", **extra}


def loss_point(backend: str, n: int, ms: float, tflops: float, fraction: float, peak: int, speedup=None) -> dict:
    fwd_bwd = timing(ms, tflops=tflops, matmul_fraction=fraction)
    if speedup is not None:
        fwd_bwd["speedup_vs_naive"] = speedup
    return {
        "loss": "clip",
        "dtype": "bf16",
        "d": 768,
        "n": n,
        "backend": backend,
        "fwd_flops": 2 * n * n * 768,
        "fwd_bwd_flops": 8 * n * n * 768,
        "status": "ok",
        "peak_extra_bytes": peak,
        "fwd_bwd": fwd_bwd,
        "fwd": timing(ms / 3),
    }


def loss_payload() -> dict:
    """bench_loss.py's schema; the points listed out of the config's backend order on purpose."""
    return {
        "benchmark": "contrastive_loss",
        "environment": ENVIRONMENT,
        "config": {"loss": "clip", "device": "cuda", "backends": ["naive", "torch", "cuda-chunked"]},
        "matmul_tflops": {"bf16": 790.3878080082753},
        "points": [
            loss_point(
                "cuda-chunked", 16384, 6.225855827331543, 264.9061410037326, 0.3351597004909254, 391556096, 1.82
            ),
            loss_point("naive", 16384, 11.337376117706299, 145.4717056699067, 0.18405104961890253, 4857136128),
            loss_point("torch", 16384, 80.64734268188477, 20.450363109539417, 0.02587383421446362, 353588224, 0.14),
            {
                "loss": "clip",
                "dtype": "bf16",
                "d": 768,
                "n": 262144,
                "backend": "naive",
                "status": "oom",
                "reason": "CUDA out of memory. Tried to allocate 128.00 GiB.",
            },
            loss_point("cuda-chunked", 262144, 1254.0, 336.7, 0.426, 3560000000, None),
        ],
    }


def siglip_payload() -> dict:
    payload = loss_payload()
    payload["config"]["loss"] = "siglip"
    payload["target"] = {
        "dtype": "bf16",
        "d": 768,
        "n": 65536,
        "backend": "cuda",
        "min_speedup": 2.0,
        "max_memory_fraction": 0.05,
        "fused_status": "ok",
        "naive_status": "ok",
        "met": True,
        "fwd_bwd_speedup_vs_naive": 2.47,
        "memory_vs_naive": 0.0123,
    }
    return payload


def attention_payload() -> dict:
    """bench_attention.py's schema (attention_cuda.json)."""
    fastclip = {"fwd": timing(0.5, tflops=80.0), "fwd_bwd": timing(1.234, tflops=120.7), "max_abs_diff": 0.0}
    flash = {"fwd": timing(0.7, tflops=60.0), "fwd_bwd": timing(1.8, tflops=82.6), "max_abs_diff": 0.004}
    row = {
        "shape": "vit_b16",
        "batch": 256,
        "heads": 12,
        "seq": 197,
        "head_dim": 64,
        "causal": False,
        "padded": False,
        "dtype": "bf16",
        "results": {
            "fastclip": fastclip,
            "sdpa_flash": flash,
            "sdpa_cudnn": {"skipped": "RuntimeError: No available kernel."},
        },
        "best_sdpa": "sdpa_flash",
        "speedups_vs_best_sdpa": {"fastclip": 1.8 / 1.234},
        "fwd_bwd_speedup_vs_best_sdpa": 1.8 / 1.234,
        "target": {"min_speedup": 1.5, "dtype": "bf16", "speedup": 1.8 / 1.234, "met": False, "note": ""},
    }
    return {"benchmark": "attention", "environment": ENVIRONMENT, "device": "cuda", "rows": [row]}


def train_row(impl: str, batch: int, samples_per_s: float | None) -> dict:
    if samples_per_s is None:
        return {"impl": impl, "batch": batch, "status": "oom", "reason": "CUDA out of memory."}
    return {
        "impl": impl,
        "batch": batch,
        "status": "ok",
        "first_loss": 6.2,
        "peak_bytes": 2**34,
        "state_bytes": 2**31,
        "peak_extra_bytes": 2**33,
        "step": timing(batch / samples_per_s * 1e3),
        "samples_per_s": samples_per_s,
    }


def train_payload() -> dict:
    """bench_train.py's schema: the baseline runs out of memory at 2048, fastclip at 4096."""
    rows = [
        train_row("baseline", 1024, 1510.4),
        train_row("baseline", 2048, None),
        train_row("fastclip", 1024, 1987.6),
        train_row("fastclip", 2048, 2011.0),
        train_row("fastclip", 4096, None),
    ]
    summary = {
        "largest_batch": {"baseline": 1024, "fastclip": 2048},
        "throughput_ratio": {"1024": 1987.6 / 1510.4},
        "throughput_ratio_at": 1024,
        "largest_batch_ratio": 2.0,
        "targets": {"throughput_ratio": 1.2, "largest_batch_ratio": 2.0},
        "throughput_target_met": True,
        "largest_batch_target_met": True,
    }
    config = {"model": "ViT-B-16", "precision": "bf16", "grad_checkpointing": False}
    return {"benchmark": "train_step", "environment": ENVIRONMENT, "config": config, "rows": rows, "summary": summary}


def model_payload() -> dict:
    """bench_model.py's schema: triton and torch per model, tower and batch."""

    def result(per_s: float, ratio: float) -> dict:
        return {**timing(256 / per_s * 1e3), "per_s": per_s, "ratio_vs_torch": ratio}

    rows = [
        {
            "model": "ViT-B-16",
            "tower": "image",
            "batch": 256,
            "results": {"triton": result(4321.9, 1.13), "torch": result(3824.7, 1.0)},
        },
        {
            "model": "ViT-B-16",
            "tower": "text",
            "batch": 256,
            "caption_lengths": {"mean": 18.42, "min": 5, "max": 61},
            "results": {"triton": result(51234.0, 1.61), "torch": result(31822.4, 1.0)},
        },
    ]
    config = {"precision": "bf16", "backends": ["triton", "torch"]}
    return {"benchmark": "model_inference", "environment": ENVIRONMENT, "config": config, "rows": rows}


def write(folder: Path, files: dict[str, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in files.items():
        (folder / name).write_text(json.dumps(payload, indent=2))
    return folder


ALL = {
    "bench_loss.json": loss_payload(),
    "bench_loss_siglip.json": siglip_payload(),
    "attention_cuda.json": attention_payload(),
    "bench_train.json": train_payload(),
    "bench_model.json": model_payload(),
}
README = """# project

text before, kept as it is

<!-- gpu-results:begin (written by `python tools/results_table.py`; edit that script, not this block) -->
stale line typed by hand
<!-- gpu-results:end -->

## after
trailing text
"""


def rendered(folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert results_table.main([str(folder)]) == 0
    return capsys.readouterr().out


def test_three_significant_figures() -> None:
    assert [results_table.sig(x) for x in (0.8876, 11.337, 202.13, 1573.4, 0.03954, 99.96, 0.0)] == [
        "0.888",
        "11.3",
        "202",
        "1570",
        "0.0395",
        "100",
        "0",
    ]
    assert results_table.sig(None) == "n/a" and results_table.sig(float("nan")) == "n/a"
    assert results_table.size(391556096) == "373 MiB" and results_table.size(4857136128) == "4.52 GiB"


def test_header_names_the_environment_and_the_matmul_rate(tmp_path: Path, capsys) -> None:
    first = rendered(write(tmp_path / "r", {"bench_loss.json": loss_payload()}), capsys).splitlines()[0]
    for text in ("NVIDIA H200", "driver 580.159.04", "CUDA 13.0", "torch 2.11.0+cu130", "Triton 3.6.0"):
        assert text in first
    assert "`cbb9492`" in first and "uncommitted" in first
    assert "bf16 790 TFLOP/s" in first


def test_clean_tree_is_not_called_dirty(tmp_path: Path, capsys) -> None:
    payload = loss_payload()
    payload["environment"] = {**ENVIRONMENT, "git_dirty": False}
    assert "uncommitted" not in rendered(write(tmp_path / "r", {"bench_loss.json": payload}), capsys)


def test_loss_rows_show_the_json_figures(tmp_path: Path, capsys) -> None:
    out = rendered(write(tmp_path / "r", {"bench_loss.json": loss_payload()}), capsys)
    # ms, TFLOP/s, % of the matmul rate, peak memory, speed-up over naive: each the JSON's, to 3 figures
    assert "| bf16 | 768 | 16384 | `cuda-chunked` | 6.23 | 265 | 33.5% | 373 MiB | 1.82× |" in out
    assert "| bf16 | 768 | 16384 | `naive` | 11.3 | 145 | 18.4% | 4.52 GiB | – |" in out
    assert "| bf16 | 768 | 262144 | `cuda-chunked` | 1250 | 337 | 42.6% | 3.32 GiB | – |" in out


def test_a_point_that_did_not_run_shows_its_status(tmp_path: Path, capsys) -> None:
    out = rendered(write(tmp_path / "r", {"bench_loss.json": loss_payload()}), capsys)
    assert "| bf16 | 768 | 262144 | `naive` | oom | – | – | – | – |" in out


def test_backends_in_the_config_order(tmp_path: Path, capsys) -> None:
    out = rendered(write(tmp_path / "r", {"bench_loss.json": loss_payload()}), capsys)
    rows = [line for line in out.splitlines() if line.startswith("| bf16 | 768 | 16384 |")]
    assert [row.split(" | ")[3] for row in rows] == ["`naive`", "`torch`", "`cuda-chunked`"]


def test_failed_check_is_flagged(tmp_path: Path, capsys) -> None:
    payload = loss_payload()
    payload["points"][0]["check"] = {"loss_abs_err": 1.0, "ok": False}
    assert "`cuda-chunked` (check failed)" in rendered(write(tmp_path / "r", {"bench_loss.json": payload}), capsys)


def test_siglip_section_and_its_target(tmp_path: Path, capsys) -> None:
    out = rendered(write(tmp_path / "r", {"bench_loss_siglip.json": siglip_payload()}), capsys)
    assert "SigLIP" in out and "Contrastive loss (CLIP)" not in out
    assert "≥ 2× naive's speed at < 5% of its memory; measured 2.47× at 1.23% of its memory: met" in out


def test_attention_speedup_and_target(tmp_path: Path, capsys) -> None:
    out = rendered(write(tmp_path / "r", {"attention_cuda.json": attention_payload()}), capsys)
    assert "| vit_b16 (B 256, H 12, S 197, d 64) | bf16 | `fastclip` | 1.23 | 121 | 1.46× | ≥ 1.5×: **missed** |" in out
    assert "|  |  | `sdpa_flash` (best SDPA) | 1.80 | 82.6 | – |  |" in out
    assert "|  |  | `sdpa_cudnn` | skipped | – | – |  |" in out


def test_attention_target_met(tmp_path: Path, capsys) -> None:
    payload = attention_payload()
    payload["rows"][0]["target"].update(min_speedup=1.3, met=True)
    out = rendered(write(tmp_path / "r", {"attention_cuda.json": payload}), capsys)
    assert "| 1.46× | ≥ 1.3×: met |" in out


def test_train_throughput_and_largest_batch(tmp_path: Path, capsys) -> None:
    out = rendered(write(tmp_path / "r", {"bench_train.json": train_payload()}), capsys)
    assert "#### Training step: ViT-B-16, bf16" in out
    assert "| 1024 | 1510 | 1990 | 1.32× |" in out
    assert "| 2048 | oom | 2010 | – |" in out
    assert "| 4096 | – | oom | – |" in out
    assert "baseline 1024 (out of memory at 2048), fastclip 2048 (out of memory at 4096)" in out
    assert "MFU" not in out  # not in the JSON: no column


def test_train_mfu_when_recorded(tmp_path: Path, capsys) -> None:
    payload = train_payload()
    payload["rows"][0]["mfu"], payload["rows"][2]["mfu"] = 0.312, 0.4107
    out = rendered(write(tmp_path / "r", {"bench_train.json": payload}), capsys)
    assert "| baseline MFU | fastclip MFU |" in out
    assert "| 1024 | 1510 | 1990 | 1.32× | 31.2% | 41.1% |" in out
    assert "its largest batch: 2.00×, met." in out  # no MFU target in this summary


def test_train_mfu_target(tmp_path: Path, capsys) -> None:
    payload = train_payload()
    payload["summary"]["targets"]["mfu"] = 0.35
    payload["summary"].update(fastclip_mfu=0.2846, mfu_target_met=False)
    out = rendered(write(tmp_path / "r", {"bench_train.json": payload}), capsys)
    assert "its largest batch: 2.00×, met; fastclip's MFU ≥ 35.0% there: 28.5%, **missed**." in out


def test_model_throughput_per_backend(tmp_path: Path, capsys) -> None:
    out = rendered(write(tmp_path / "r", {"bench_model.json": model_payload()}), capsys)
    assert "| model | tower | batch | `triton` | `torch` | `triton` / `torch` |" in out
    assert "| ViT-B-16 | image (images/s) | 256 | 4320 | 3820 | 1.13× |" in out
    assert "| ViT-B-16 | text (captions/s), captions mean 18.4 tokens | 256 | 51200 | 31800 | 1.61× |" in out


def test_missing_files_get_no_section(tmp_path: Path, capsys) -> None:
    out = rendered(write(tmp_path / "r", {"bench_model.json": model_payload()}), capsys)
    assert "#### Inference" in out
    assert not any(word in out for word in ("loss", "Attention", "Training", "SigLIP"))
    full = rendered(write(tmp_path / "all", ALL), capsys)
    headings = [line for line in full.splitlines() if line.startswith("####")]
    assert len(headings) == 5


def test_readme_block_replaced_between_the_markers(tmp_path: Path, capsys) -> None:
    folder = write(tmp_path / "benchmarks" / "results" / "NVIDIA_H200", ALL)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert results_table.main([str(folder), "--readme", str(readme)]) == 0
    assert capsys.readouterr().out == ""
    text = readme.read_text()
    head, rest = README.split("stale line typed by hand\n")
    assert text.startswith(head) and text.endswith(rest)  # markers and everything outside untouched
    block = text[len(head) : len(text) - len(rest)]
    markdown = rendered(folder, capsys)
    assert block == "\n" + markdown.replace("`" + str(folder) + "`", "`benchmarks/results/NVIDIA_H200`") + "\n"
    assert "Generated from `benchmarks/results/NVIDIA_H200`" in block
    assert "stale line" not in text
    # a second run changes nothing
    assert results_table.main([str(folder), "--readme", str(readme)]) == 0
    assert readme.read_text() == text


def test_check_passes_when_fresh_and_fails_after_the_json_changes(tmp_path: Path, capsys) -> None:
    folder = write(tmp_path / "results", ALL)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert results_table.main([str(folder), "--readme", str(readme), "--check"]) == 1
    assert readme.read_text() == README  # --check writes nothing
    capsys.readouterr()
    assert results_table.main([str(folder), "--readme", str(readme)]) == 0
    assert results_table.main([str(folder), "--readme", str(readme), "--check"]) == 0
    assert capsys.readouterr().err == ""
    changed = copy.deepcopy(ALL["bench_loss.json"])
    changed["points"][0]["fwd_bwd"]["median_ms"] = 5.0
    write(folder, {"bench_loss.json": changed})
    fresh = readme.read_text()
    assert results_table.main([str(folder), "--readme", str(readme), "--check"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "stale" in err
    assert readme.read_text() == fresh


def test_missing_folder_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    assert results_table.main([str(tmp_path / "nowhere")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "nowhere" in captured.err


def test_folder_without_json_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert results_table.main([str(tmp_path / "empty")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "text",
    [
        "# no markers\n",
        "<!-- gpu-results:begin -->\nonly the start\n",
        "<!-- gpu-results:end -->\n<!-- gpu-results:begin -->\n",
    ],
)
def test_missing_markers_exit_2_and_leave_the_file(tmp_path: Path, capsys, text: str) -> None:
    folder = write(tmp_path / "results", {"bench_loss.json": loss_payload()})
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert results_table.main([str(folder), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "gpu-results" in err
    assert readme.read_text() == text


def test_check_needs_readme(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        results_table.main([str(tmp_path), "--check"])
    assert exit_info.value.code == 2


def test_command_line(tmp_path: Path) -> None:
    folder = write(tmp_path / "results", {"bench_train.json": train_payload()})
    ok = subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True, text=True)
    assert ok.returncode == 0 and "| 1024 | 1510 | 1990 | 1.32× |" in ok.stdout
    missing = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stdout == "" and len(missing.stderr.strip().splitlines()) == 1


def test_readme_block_is_the_committed_gpu_results() -> None:
    """The README's GPU tables are exactly what the committed JSON renders to (nothing typed by hand)."""
    repo = SCRIPT.parents[1]
    args = [str(repo / "benchmarks/results/NVIDIA_H200"), "--readme", str(repo / "README.md"), "--check"]
    assert results_table.main(args) == 0
