"""Cluster-grade behaviour (issue 12): fail before the first step, stop on time, never hang, verified checkpoints.

The slow multi-process cases (a frozen rank, a killed "node" restarted by torchrun) are at the end.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import REPO, SCRIPTS, TINY_MOE, torchrun
from test_training_job import assert_one_line_error, launch

from megatron_moe.arguments import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 3-iteration run saved and stopped after iteration 2 by one process (the LR schedule is the one
    :func:`resume` continues): (checkpoint root, its iter_0000002 directory)."""
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    result = launch(TINY_MOE + ["--train-iters", "3", "--exit-interval", "2", "--save", str(root)])
    assert result.returncode == 0, result.stderr[-3000:]
    return root, root / "iter_0000002"


def copy_of(saved, tmp_path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(saved[0], root)
    return root


def resume(root, *extra):
    return launch(TINY_MOE + ["--train-iters", "3", "--load", str(root), *extra])


# --- fail before the first step --------------------------------------------------------------------------

def test_unwritable_save_fails_before_the_model_is_built(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = launch(TINY_MOE + ["--train-iters", "2", "--save", str(blocker / "ckpt")])
    assert_one_line_error(result, f"--save {blocker / 'ckpt'}: not writable")
    assert "arguments ---" not in result.stdout, "the check comes before the model is built"


def test_save_without_room_for_a_checkpoint_is_refused(tmp_path):
    from megatron_moe.checkpointing import check_save_space

    free = shutil.disk_usage(tmp_path).free
    check_save_space(str(tmp_path), free // 2)
    with pytest.raises(ConfigError, match=r"--save .*MiB free, a checkpoint of this model needs about"):
        check_save_space(str(tmp_path), free * 2)


def test_checkpoint_size_estimate_covers_what_a_save_writes(saved):
    """The estimate the start-up check uses (printed by every run with --save) is at least what was written."""
    written = sum(path.stat().st_size for path in saved[1].rglob("*") if path.is_file())
    log = launch(TINY_MOE + ["--train-iters", "1", "--save", str(saved[0].parent / "again")]).stdout
    estimate = float(log.split("> a checkpoint takes about ")[1].split(" MiB")[0]) * 2**20
    assert written <= estimate <= 2 * written, (written, estimate)


def test_non_utf8_tracker_is_one_line(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    (root / TRACKER).write_bytes(b"\xff\xfe\x00garbage")
    assert_one_line_error(resume(root), f"{root / TRACKER} holds", "not an iteration number")


def test_checkpoint_missing_metadata_is_one_line_before_the_model_is_built(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    (root / "iter_0000002" / ".metadata").unlink()
    result = resume(root)
    assert_one_line_error(result, f"{root / 'iter_0000002' / '.metadata'} is missing")
    assert "arguments ---" not in result.stdout


# --- verified checkpoints --------------------------------------------------------------------------------

def test_every_saved_file_is_in_the_manifest(saved):
    manifest = json.loads((saved[1] / "manifest.json").read_text())
    on_disk = {str(p.relative_to(saved[1])) for p in saved[1].rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == on_disk and {".metadata", "run_config.json"} <= on_disk


def test_same_size_garbled_shard_is_never_loaded(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    shard = sorted((root / "iter_0000002").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = os.urandom(64)
    shard.write_bytes(bytes(data))
    assert_one_line_error(resume(root), f"{shard} does not match its sha256 digest")

    from megatron_moe.checkpoint_files import verify_checkpoint  # the function export calls, one process
    with pytest.raises(ConfigError, match=shard.name):
        verify_checkpoint(root / "iter_0000002")
    verify_checkpoint(saved[1])  # the intact original passes


def test_checkpoint_without_manifest_needs_the_skip_flag(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    (root / "iter_0000002" / "manifest.json").unlink()
    assert_one_line_error(resume(root), "manifest.json is missing", "--no-verify-checkpoint")
    result = resume(root, "--no-verify-checkpoint")
    assert result.returncode == 0, result.stderr[-3000:]
    assert " iteration        3/" in result.stdout


# --- stop on time ----------------------------------------------------------------------------------------

def test_exit_interval_saves_and_exits_zero(tmp_path):
    ckpt = tmp_path / "ckpt"
    result = launch(TINY_MOE + ["--train-iters", "10", "--exit-interval", "3", "--save", str(ckpt)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (ckpt / TRACKER).read_text() == "3"
    assert "> --exit-interval 3: saved iteration 3" in result.stdout
    assert " iteration        4/" not in result.stdout


def test_exit_duration_is_agreed_by_every_rank_saved_and_exits_zero(tmp_path):
    ckpt = tmp_path / "ckpt"
    # 0.0001 min = 6 ms: over after the first iteration, on each rank at its own time
    result = torchrun(2, REPO / "pretrain_gpt_moe.py", TINY_MOE + [
        "--expert-model-parallel-size", "2", "--train-iters", "50", "--exit-duration-in-mins", "0.0001",
        "--save", str(ckpt)])
    assert (ckpt / TRACKER).read_text() == "1"
    assert "> --exit-duration-in-mins 0.0001: saved iteration 1" in result.stdout


def test_eval_iters_zero_means_no_validation():
    result = launch(TINY_MOE + ["--train-iters", "2", "--eval-iters", "0", "--eval-interval", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert " iteration        2/" in result.stdout and "validation loss" not in result.stdout


@pytest.mark.parametrize("flags, validated", [
    ([], ["iteration 2 on validation set"]),  # no --eval-interval: only the final validation
    (["--eval-interval", "1", "--exit-interval", "1"], ["iteration 1"]),  # an early exit skips the final one
])
def test_validation_happens_when_megatron_lm_validates(flags, validated):
    i = TINY_MOE.index("--eval-interval")
    result = launch(TINY_MOE[:i] + TINY_MOE[i + 2:] + ["--train-iters", "2", *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split(" | ")[0].removeprefix(" validation loss at ") for line in result.stdout.splitlines()
            if line.startswith(" validation loss at")] == validated


@pytest.mark.parametrize("cap_flags, stops_at", [([], 11), (["--max-consecutive-skipped-iterations", "3"], 4),
                                                 (["--max-skipped-iterations", "2"], 3)])
def test_skipped_iterations_are_capped(cap_flags, stops_at):
    # lr 1e30: every update from the second on is NaN and skipped
    result = launch(TINY_MOE + ["--train-iters", "20", "--lr", "1e30", "--skip-nan-iterations", *cap_flags])
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"pretrain_gpt_moe.py: error: iteration {stops_at}: ") and "skipped" in line, line
    assert "Traceback" not in result.stderr


# --- never hang ------------------------------------------------------------------------------------------

def test_frozen_rank_ends_the_job_within_the_timeout(tmp_path):
    """Rank 1 freezes (SIGSTOP) after iteration 2; with a 1-minute timeout rank 0's next collective, in the
    expert-parallel group (megatron's 30-minute default unless the timeout reaches it), fails within a minute,
    names itself, the collective and the group, and torchrun ends the frozen rank."""
    out = tmp_path / "out"
    result = torchrun(2, SCRIPTS / "train_with_fault.py", [str(out), *TINY_MOE, "--expert-model-parallel-size", "2",
                                                          "--train-iters", "6", "--distributed-timeout-minutes", "1"],
                      check=False, timeout=400, env=dict(FAULT_SIGNAL="STOP", FAULT_RANK="1", FAULT_AFTER="2"))
    ended = time.time()
    assert result.returncode != 0
    frozen_at = json.loads(Path(f"{out}.1.0.json").read_text())["iteration_end_times"]["2"]
    errors = [line for line in result.stderr.splitlines() if "pretrain_gpt_moe.py: error:" in line]
    assert len(errors) == 1 and "rank 0: " in errors[0] and "timed out after 1 min" in errors[0], result.stderr[-3000:]
    assert "expert" in errors[0], errors[0]
    # 60 s timeout + torchrun's 30 s between SIGTERM and SIGKILL for the stopped rank + slack on a busy machine
    assert ended - frozen_at < 125, f"every rank exited {ended - frozen_at:.0f} s after the freeze"
    print(f"every rank exited {ended - frozen_at:.1f} s after rank 1 froze")


# --- restart by itself -----------------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(prefix: Path, rank: int) -> list:
    """Rank ``rank``'s records of each torchrun attempt, oldest first."""
    paths = sorted(prefix.parent.glob(f"{prefix.name}.{rank}.*.json"), key=lambda p: int(p.name.split(".")[-2]))
    return [json.loads(p.read_text()) for p in paths]


def test_killed_node_is_relaunched_by_torchrun_and_resumes_exactly(tmp_path):
    """Two torchrun agents ("nodes", one rank each) meet by c10d rendezvous with --max-restarts 1. Rank 1 is
    SIGKILLed after iteration 3 (the last checkpoint is iteration 2): torchrun relaunches both nodes, the job
    resumes from iteration 2, and its losses and final weights equal an uninterrupted run's bit for bit."""
    flags = TINY_MOE + ["--expert-model-parallel-size", "2", "--train-iters", "6", "--save-interval", "2"]
    reference = tmp_path / "reference"
    torchrun(2, SCRIPTS / "train_with_fault.py", [str(reference), *flags, "--save", str(tmp_path / "ref_ckpt")])

    ckpt, out, port = tmp_path / "ckpt", tmp_path / "elastic", _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="",
               FAULT_SIGNAL="KILL", FAULT_RANK="1", FAULT_AFTER="3", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "reliability",
            "--max-restarts", "1", str(SCRIPTS / "train_with_fault.py"), str(out), *flags,
            "--save", str(ckpt), "--load", str(ckpt)]
    nodes = [subprocess.Popen(node, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        logs = [n.communicate(timeout=400)[0] for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-4000:] for log in logs)

    straight = [_records(reference, rank)[-1] for rank in (0, 1)]
    elastic = [_records(out, rank) for rank in (0, 1)]
    assert all(len(attempts) >= 2 for attempts in elastic), "both ranks ran again after the kill"
    killed_at = elastic[1][0]["iteration_end_times"]["3"]
    for rank in (0, 1):
        resumed = elastic[rank][-1]
        assert sorted(resumed["iteration_end_times"], key=int) == ["3", "4", "5", "6"], "resumed from iteration 2"
        assert resumed["losses"] == straight[rank]["losses"][2:]
        assert resumed["parameter_sums"] == straight[rank]["parameter_sums"]
    first_step = min(records[-1]["iteration_end_times"]["3"] for records in elastic)
    print(f"restart to first step: {first_step - killed_at:.1f} s after the kill")
