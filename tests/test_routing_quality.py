"""benchmarks/routing_quality.py: the figures it reads from a run's TensorBoard scalars, its table and plots.

The benchmark itself trains for tens of minutes; these tests feed its pieces synthetic scalars whose
figures are known, and check them end to end through TensorBoard event files the training's own writer
(megatron_moe.metrics) produces.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from launcher import REPO

spec = importlib.util.spec_from_file_location("routing_quality", REPO / "benchmarks" / "routing_quality.py")
routing_quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(routing_quality)

FLAGS = ["--global-batch-size", "4", "--seq-length", "8", "--log-interval", "2", "--eval-interval", "2"]
TOKENS_PER_ITER = 4 * 8


def scalars(final_loss: float, assignments: float):
    """Two logged intervals (iterations 2 and 4) and two evaluations (and the final one, at 4 again), like a
    run's TensorBoard scalars."""
    return {
        "validation lm loss": [(2, 10.0, final_loss + 1.0), (4, 20.0, final_loss), (4, 21.0, final_loss + 9.0)],
        "lm loss": [(2, 10.0, 7.0), (4, 20.0, 6.0)],
        "throughput (tokens/s)": [(2, 10.0, 50.0), (4, 20.0, 100.0)],
        "expert-load/layer_01/max_over_mean": [(2, 10.0, 1.5), (4, 20.0, 2.5)],
        "expert-load/layer_01/assignments": [(2, 10.0, assignments), (4, 20.0, assignments)],
        "moe-comm/rows_per_token": [(2, 10.0, 1.0), (4, 20.0, 1.0)],
        "moe-comm/remote_bytes_per_token": [(2, 10.0, 256.0), (4, 20.0, 512.0)],
    }


def test_summary_figures_of_one_run():
    # top-2 routing of 2 iterations x 32 tokens per logged interval: 128 assignments when nothing is dropped
    full = routing_quality.summarize_run(FLAGS, 2, 5.0, scalars(4.0, 2 * TOKENS_PER_ITER * 2))
    assert [point["tokens"] for point in full["validation"]] == [2 * TOKENS_PER_ITER, 4 * TOKENS_PER_ITER]
    assert [point["seconds"] for point in full["validation"]] == [5.0, 15.0]
    assert full["tokens_per_s"] == 100.0  # the first logged interval (start-up) is left out
    assert full["max_over_mean_per_layer"] == {"layer_01": 2.0}
    assert full["dropped_fraction"] == 0.0
    assert full["remote_bytes_per_token"] == 384.0
    dropping = routing_quality.summarize_run(FLAGS, 2, 5.0, scalars(4.0, 96.0))
    assert dropping["dropped_fraction"] == pytest.approx(0.25)


def record(router: str, seed: int, final_loss: float) -> dict:
    k = routing_quality.ROUTERS[router][0]
    summary = routing_quality.summarize_run(FLAGS, k, 0.0, scalars(final_loss, 2 * TOKENS_PER_ITER * k))
    return {"router": router, "seed": seed, "top_k": k, "commit": "abc", "wall_s": 60.0, "flags": FLAGS, **summary}


def test_table_averages_seeds_and_compares_with_the_best_router(tmp_path):
    records = [record("switch", 1, 5.0), record("switch", 2, 5.2), record("base", 1, 4.9), record("base", 2, 4.9)]
    table = routing_quality.aggregate(records)
    assert list(table) == ["switch", "base"]  # the benchmark's router order
    assert table["switch"]["loss"] == pytest.approx(5.1) and table["switch"]["spread"] == pytest.approx(0.1)
    text = routing_quality.format_table(table)
    assert "| switch | 1 | 1,2 | 5.100 ± 0.100 | +0.200 |" in text
    assert "| base | 1 | 1,2 | 4.900 ± 0.000 | +0.000 |" in text
    assert "| switch | 1 | 1,2 | 5.100 ± 0.100 | +0.200 | 5.000, 5.200 |" in text  # each seed's final loss
    pngs = routing_quality.plot(records, table, tmp_path)
    assert all(path.stat().st_size > 10_000 for path in pngs)


def test_report_only_rebuilds_table_and_plots_from_stored_runs_without_commits_or_speeds(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    for router, seed, loss in (("gshard", 1, 5.0), ("sam", 1, 5.1)):
        run = {**record(router, seed, loss), "commit": "d149b29+dirty"}
        (tmp_path / "runs" / f"{router}_seed{seed}.json").write_text(json.dumps(run))
    routing_quality.main(["--report-only", "--out", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    assert "| gshard | 2 | 1 | 5.000 ± 0.000 | +0.000 | 5.000 |" in table and "| sam | 2 | 1 |" in table
    assert f"after {4 * TOKENS_PER_ITER} training tokens (4 iterations)" in table
    for stale in ("d149b29", "dirty", "ommit", "tokens/s", "wall"):  # user-facing: no commits, no speeds
        assert stale not in table
    assert table in capsys.readouterr().out
    for png in ("loss.png", "expert_load.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no runs in"):
        routing_quality.main(["--report-only", "--out", str(tmp_path / "empty")])


def test_scalars_are_read_back_from_the_training_writer(tmp_path):
    from megatron_moe import metrics

    writer = metrics.open_summary_writer(str(tmp_path))
    metrics.write_scalars(writer, 2, {"validation lm loss": 5.5, "lm loss": math.log(257)})
    metrics.write_expert_load(writer, 2, {1: [3.0, 1.0]})
    writer.close()
    _, read = routing_quality.read_scalars(tmp_path)
    assert [value for _, _, value in read["validation lm loss"]] == [5.5]
    assert [value for _, _, value in read["expert-load/layer_01/assignments"]] == [4.0]
    assert [value for _, _, value in read["expert-load/layer_01/max_over_mean"]] == [1.5]


def test_smoke_mode_end_to_end_and_resume(tmp_path):
    if not (REPO / "data" / "kjv_text_document.idx").is_file():
        pytest.skip("no KJV data: run `bash examples/prepare_kjv_data.sh`")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "routing_quality.py"), "--smoke", "--routers", "switch", "--out", str(out),
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
