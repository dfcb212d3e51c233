"""benchmarks/routing_quality.py: the figures it reads from a run's scalars, and its smoke mode end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "routing_quality.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("routing_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summarize_run_reads_validation_load_drops_and_traffic():
    bench = _load_benchmark()
    flags = ["--global-batch-size", "4", "--seq-length", "8", "--log-interval", "2"]  # 32 tokens per iteration
    start = 100.0
    scalars = {
        "validation lm loss": [(2, 110.0, 7.0), (4, 125.0, 6.5)],
        "lm loss": [(2, 109.0, 7.5), (4, 124.0, 6.4)],
        "throughput (tokens/s)": [(2, 109.0, 10.0), (4, 124.0, 30.0)],
        # k=2: 2 logged intervals x 2 iterations x 32 tokens x 2 = 256 assignments per layer when dropless
        "expert-load/layer_01/max_over_mean": [(2, 0, 1.5), (4, 0, 2.5)],
        "expert-load/layer_01/assignments": [(2, 0, 128.0), (4, 0, 128.0)],
        "expert-load/layer_02/max_over_mean": [(2, 0, 1.0), (4, 0, 1.0)],
        "expert-load/layer_02/assignments": [(2, 0, 128.0), (4, 0, 64.0)],
        "moe-comm/rows_per_token": [(2, 0, 1.0), (4, 0, 1.0)],
        "moe-comm/remote_bytes_per_token": [(2, 0, 500.0), (4, 0, 600.0)],
    }
    summary = bench.summarize_run(flags, 2, start, scalars)
    assert summary["validation"] == [{"iteration": 2, "tokens": 64, "seconds": 10.0, "loss": 7.0},
                                     {"iteration": 4, "tokens": 128, "seconds": 25.0, "loss": 6.5}]
    assert summary["tokens_per_s"] == 30.0  # the first logged iteration is left out
    assert summary["max_over_mean_per_layer"] == {"layer_01": 2.0, "layer_02": 1.0}
    assert summary["dropped_fraction"] == pytest.approx(64 / 512)
    assert summary["remote_bytes_per_token"] == 550.0


def test_smoke_mode_end_to_end_and_resume(tmp_path):
    if not (REPO / "data" / "kjv_text_document.idx").is_file():
        pytest.skip("no KJV data: run `bash examples/prepare_kjv_data.sh`")
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--routers", "switch", "--out", str(out),
           "--work", str(tmp_path / "work"), "--device", "cpu"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "| switch | 1 | 1 |" in (out / "table.md").read_text()
    for png in ("loss.png", "expert_load.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "runs" / "switch_seed1.json").read_text())
    validation = [point["loss"] for point in record["validation"]]
    train = [point["loss"] for point in record["train_loss"]]
    assert all(math.isfinite(loss) for loss in validation + train)
    assert validation[-1] < validation[0] and train[-1] < train[0]
    assert record["dropped_fraction"] == pytest.approx(0.0, abs=1e-9)  # no capacity factor: dropless
    assert record["rows_per_token"] == 1.0

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "[skip] switch seed 1" in again.stdout
