"""benchmarks/gpu_first_contact.py --dry-run: every step of the one-command GPU check runs on the CPU with tiny
sizes and writes its figures, so the script a lent GPU will run cannot rot."""

import json
import os
import subprocess
import sys

import pytest

from launcher import REPO

STEPS = ("cuda_vs_cpu", "pretrain", "mfu_topk", "mfu_sam", "mfu_base", "base_solver", "fp8_gemm", "save_kill_resume")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("first_contact")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "benchmarks/gpu_first_contact.py", "--dry-run", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    figures = json.loads((out / "figures.json").read_text())
    print(result.stdout, (out / "summary.md").read_text(), f"dry run: {figures['environment']['total_seconds']:.0f} s",
          sep="\n")
    return result, figures, (out / "summary.md").read_text()


def test_every_step_runs_and_is_summarised(dry_run):
    result, figures, summary = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in STEPS:
        # the solver's GPU mode comes with issue 17; until then the step says so
        allowed = ("ok", "not available") if step == "base_solver" else ("ok",)
        assert figures[step]["status"] in allowed, (step, figures[step])
        assert f"| {step} | {figures[step]['status']} |" in summary


def test_figures_are_the_promised_ones(dry_run):
    _, figures, _ = dry_run
    assert figures["cuda_vs_cpu"]["worst_gradient_relative_error"] <= figures["cuda_vs_cpu"]["rtol"]
    assert figures["cuda_vs_cpu"]["gradients_compared"] > 10
    assert figures["pretrain"]["loss_falls"] and figures["pretrain"]["tokens_per_second"] > 0
    for router, k in (("topk", 2), ("sam", 2), ("base", 1)):
        record = figures[f"mfu_{router}"]
        assert record["top_k"] == k and record["model_tflops"] > 0 and 0 < record["mfu"] < 1
    # the tiny model, by hand: 6 * (2 layers * (2h(h + h) + hE + k * 3hf) + hV) + 12 L h s
    h, layers, experts, ffn, vocab, seq = 64, 2, 4, 128, 1024, 32
    per_layer = 2 * h * 2 * h + h * experts + 2 * 3 * h * ffn
    assert figures["mfu_topk"]["flops_per_token"] == 6 * (layers * per_layer + h * vocab) + 12 * layers * h * seq
    gemm = figures["fp8_gemm"]["gemms"][0]
    assert gemm["fp8_tflops"] > 0 and gemm["fp8_relative_error"] < 0.1  # e4m3 keeps 3 mantissa bits
    resumed = figures["save_kill_resume"]
    assert resumed["same_next_losses"] and resumed["killed_run_status"] == -9


def test_a_failing_step_keeps_the_others_and_a_dead_worker_is_replaced(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_first_contact as script

    run = script.Run(tmp_path, dry_run=True, budget=120)
    (tmp_path / "results").mkdir()
    fp8 = dict(device="cpu", shapes=script.TINY_FP8_SHAPES, repeats=1)
    plans = [script.plan(run, "broken", "fp8_gemm", **{**fp8, "device": "no-such-device"}),
             # argparse ends the worker process (status 2): the next worker runs what is left
             script.plan(run, "exits", "resume", flags=["--not-a-flag"]),
             script.plan(run, "fine", "fp8_gemm", **fp8)]
    arrived = []
    results = run.work("test", plans, timeout=100, on_result=lambda name, result: arrived.append(name))
    assert results["broken"]["status"] == "failed" and "no-such-device" in results["broken"]["error"]
    assert results["exits"]["status"] == "failed" and "worker process died (status 2)" in results["exits"]["error"]
    assert results["fine"]["status"] == "ok" and arrived == ["broken", "exits", "fine"]
