"""Cluster-grade behaviour (issue 12): fail before the first step, stop on time, never hang, verified checkpoints.

The slow multi-process cases (a frozen rank, a killed "node" restarted by torchrun) are at the end.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import REPO, SCRIPTS, TINY_MOE, assert_one_line_error, launch, torchrun

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
    # Megatron-LM's lines around a save, then its timer line (milliseconds of the fastest and slowest rank)
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "] saving checkpoint at iteration" in line)
    assert re.fullmatch(rf"\[20\d\d-[\d-]+ [\d:.]+\] saving checkpoint at iteration       3 to {ckpt} in torch_dist format",
                        lines[start]), lines[start]
    assert re.fullmatch(rf"  \[20\d\d-[\d-]+ [\d:.]+\] successfully saved checkpoint from iteration       3 to {ckpt} "
                        r"\[ t 1/1, p 1/1 \]", lines[start + 1]), lines[start + 1]
    assert lines[start + 2] == "(min, max) time across ranks (ms):"
    fastest, slowest = map(float, re.fullmatch(r"    save-checkpoint \.+: \(([\d.]+), ([\d.]+)\)",
                                               lines[start + 3]).groups())
    assert 0 < fastest <= slowest


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


# pretrain_gpt_moe.py with a progress line after every evaluation batch (instead of every 30 s)
EVERY_EVAL_BATCH = ("import runpy, sys; import megatron_moe.training as training; training.EVAL_PROGRESS_SECONDS = 0; "
                    "sys.argv[0] = 'pretrain_gpt_moe.py'; runpy.run_path('pretrain_gpt_moe.py', run_name='__main__')")


@pytest.mark.parametrize("flags, validated", [
    ([], ["iteration 2 on validation set"]),  # no --eval-interval: only the final validation
    (["--eval-interval", "1", "--exit-interval", "1"], ["iteration 1"]),  # an early exit skips the final one
])
def test_validation_happens_when_megatron_lm_validates(flags, validated):
    i = TINY_MOE.index("--eval-interval")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", EVERY_EVAL_BATCH, *TINY_MOE[:i], *TINY_MOE[i + 2:],
                             "--train-iters", "2", "--eval-iters", "2", *flags],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split(" | ")[0].removeprefix(" validation loss at ") for line in result.stdout.splitlines()
            if line.startswith(" validation loss at")] == validated
    # a long evaluation shows its progress (Megatron-LM's words), here after each of its 2 batches
    progress = [line for line in result.stdout.splitlines() if line.startswith("Evaluating iter")]
    assert [line.split(" (")[0] for line in progress] == ["Evaluating iter 1/2", "Evaluating iter 2/2"], progress
    assert all(re.fullmatch(r"Evaluating iter \d/2 \([\d.]+ s\)", line) for line in progress), progress


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
    """Rank 1 freezes (SIGSTOP) after iteration 2; with a 30-second timeout rank 0's next collective, in the
    expert-parallel group (megatron's 30-minute default unless the timeout reaches it), fails within it,
    names itself, the collective and the group, and torchrun ends the frozen rank."""
    out = tmp_path / "out"
    result = torchrun(2, SCRIPTS / "train_with_fault.py", [str(out), *TINY_MOE, "--expert-model-parallel-size", "2",
                                                          "--train-iters", "6", "--distributed-timeout-minutes", "0.5"],
                      check=False, timeout=400, env=dict(FAULT_SIGNAL="STOP", FAULT_RANK="1", FAULT_AFTER="2"))
    ended = time.time()
    assert result.returncode != 0
    frozen_at = json.loads(Path(f"{out}.1.0.json").read_text())["iteration_end_times"]["2"]
    errors = [line for line in result.stderr.splitlines() if "pretrain_gpt_moe.py: error:" in line]
    assert len(errors) == 1 and "rank 0: " in errors[0] and "timed out after 0.5 min" in errors[0], result.stderr[-3000:]
    assert "expert" in errors[0], errors[0]
    # 30 s timeout + torchrun's 30 s between SIGTERM and SIGKILL for the stopped rank + slack on a busy machine
    assert ended - frozen_at < 95, f"every rank exited {ended - frozen_at:.0f} s after the freeze"
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


RESTART_FLAGS = TINY_MOE + ["--expert-model-parallel-size", "2", "--train-iters", "6", "--save-interval", "2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """What each rank of an uninterrupted run of RESTART_FLAGS records."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    torchrun(2, SCRIPTS / "train_with_fault.py", [str(tmp / "reference"), *RESTART_FLAGS, "--save", str(tmp / "ckpt")])
    return [_records(tmp / "reference", rank)[-1] for rank in (0, 1)]


def _rendezvous(backend: str, port: int, node_rank: int) -> list:
    if backend == "c10d":
        return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "reliability"]
    # torchrun's default: static rendezvous on the master's address
    return ["--master-addr", "127.0.0.1", "--master-port", str(port), "--node-rank", str(node_rank)]


@pytest.mark.parametrize("backend, share_store", [("c10d", "1"), ("static", "0")])
def test_killed_node_is_relaunched_by_torchrun_and_resumes_exactly(backend, share_store, uninterrupted, tmp_path):
    """Two torchrun agents ("nodes", one rank each) meet by c10d rendezvous (with a fresh store per attempt)
    or by torchrun's default static rendezvous (its store shared with the workers across attempts), with
    --max-restarts 2. Rank 1 is SIGKILLed after iteration 3 (the last checkpoint is iteration 2): torchrun
    relaunches both nodes, the job resumes from iteration 2, and its losses and final weights equal an
    uninterrupted run's bit for bit."""
    ckpt, out, port = tmp_path / "ckpt", tmp_path / "elastic", _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="",
               FAULT_SIGNAL="KILL", FAULT_RANK="1", FAULT_AFTER="3", TORCH_DISABLE_SHARE_RDZV_TCP_STORE=share_store)
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               *_rendezvous(backend, port, node_rank), "--max-restarts", "2",
                               str(SCRIPTS / "train_with_fault.py"), str(out), *RESTART_FLAGS,
                               "--save", str(ckpt), "--load", str(ckpt)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node_rank in range(2)]
    try:
        logs = [n.communicate(timeout=400)[0] for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-4000:] for log in logs)

    elastic = [_records(out, rank) for rank in (0, 1)]
    assert all(len(attempts) >= 2 for attempts in elastic), "both ranks ran again after the kill"
    killed_at = elastic[1][0]["iteration_end_times"]["3"]
    for rank in (0, 1):
        resumed = elastic[rank][-1]
        assert sorted(resumed["iteration_end_times"], key=int) == ["3", "4", "5", "6"], "resumed from iteration 2"
        assert resumed["losses"] == uninterrupted[rank]["losses"][2:]
        assert resumed["parameter_sums"] == uninterrupted[rank]["parameter_sums"]
    first_step = min(records[-1]["iteration_end_times"]["3"] for records in elastic)
    print(f"{backend} rendezvous: restart to first step {first_step - killed_at:.1f} s after the kill")


def test_restarts_that_could_not_meet_are_refused_with_the_ways_that_work(monkeypatch):
    """c10d rendezvous over several nodes with its store shared across attempts: the restart counts of the
    nodes may differ, so the start is refused naming TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and static rendezvous.
    One node, or static rendezvous (recognised by its agents' rank assignment in the store), may restart."""
    import torch.distributed as dist

    from megatron_moe.platform import elastic_restart_problem

    store = dist.HashStore()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    problem = elastic_restart_problem(store)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in problem and "static rendezvous" in problem
    store.set("job7/torchelastic/assigned_ranks/0", "[]")  # what torchrun's agents write with static rendezvous
    assert elastic_restart_problem(store) is None
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    assert elastic_restart_problem(dist.HashStore()) is None
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert elastic_restart_problem(dist.HashStore()) is None


# --- one writer per --save directory ---------------------------------------------------------------------

def _wait_for(condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie that nobody reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _start(script, args, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def test_second_job_on_the_same_save_is_refused_and_a_dead_job_leaves_no_lock(tmp_path):
    """A job resubmitted while the first still writes --save stops in one line naming the running one; once the
    first is killed (SIGKILL: no clean-up of its own), a new job starts and saves."""
    ckpt, log = tmp_path / "ckpt", tmp_path / "first.log"
    first = _start(REPO / "pretrain_gpt_moe.py", [*TINY_MOE, "--train-iters", "100000", "--save-interval", "1000",
                                                  "--save", str(ckpt)], log)
    try:
        _wait_for(lambda: " iteration        1/" in log.read_text() or first.poll() is not None, "the first job")
        second = launch(TINY_MOE + ["--train-iters", "1", "--save", str(ckpt)])
        line = assert_one_line_error(second, f"--save {ckpt}: another job is writing there (pid {first.pid} on ")
        assert "give this job another --save" in line and "arguments ---" not in second.stdout
    finally:
        first.kill()
        first.wait()
    third = launch(TINY_MOE + ["--train-iters", "1", "--save", str(ckpt)])
    assert third.returncode == 0, third.stderr[-3000:]
    assert (ckpt / TRACKER).read_text() == "1"


def test_rank_killed_mid_save_takes_its_writer_processes_along(tmp_path):
    """megatron-core's checkpoint writer forks write processes; SIGKILL the rank while they write (held in
    a 300 s sleep): they end with it. The save's unfinished folder never takes the iteration's name, and the
    next job on --save removes it and resumes from the last whole checkpoint."""
    ckpt, pids, log = tmp_path / "ckpt", tmp_path / "pids", tmp_path / "rank.log"
    pids.mkdir()
    rank = _start(SCRIPTS / "slow_checkpoint_writer.py", [str(pids), *TINY_MOE, "--train-iters", "2",
                                                          "--save", str(ckpt)], log)
    try:
        _wait_for(lambda: len(list(pids.glob("writer.*"))) >= 2 or rank.poll() is not None, "the write processes")
        writers = {int(path.name.split(".")[1]): int(path.read_text()) for path in pids.glob("writer.*")}
        assert len(writers) >= 2 and set(writers.values()) == {rank.pid}, (writers, log.read_text()[-3000:])
        rank.kill()
        rank.wait()
        _wait_for(lambda: not any(_alive(pid) for pid in writers), "the write processes to end", timeout=10)
    finally:
        rank.kill()
        for pid in writers if "writers" in locals() else ():
            if _alive(pid):
                os.kill(pid, 9)
    assert not (ckpt / "iter_0000002").exists() and not (ckpt / TRACKER).exists()
    unfinished = [path.name for path in ckpt.glob("iter_0000002.partial-*")]
    assert len(unfinished) == 1, sorted(os.listdir(ckpt))

    again = launch(TINY_MOE + ["--train-iters", "2", "--save", str(ckpt), "--load", str(ckpt)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"removed 1 unfinished save folder(s) of a job that ended during a save: {unfinished[0]}" in again.stdout
    assert sorted(path.name for path in ckpt.glob("iter_*")) == ["iter_0000002"]


def test_tracker_naming_a_missing_iteration_says_the_folder_is_missing(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    shutil.rmtree(root / "iter_0000002")
    assert_one_line_error(resume(root), f"--load: {root / TRACKER} names iteration 2, but the folder "
                                        f"{root / 'iter_0000002'} is missing")


def test_our_own_error_while_loading_is_not_reported_as_a_damaged_checkpoint(saved, tmp_path):
    """Only the read of the files is reported as damage: a bug of ours building the load template surfaces."""
    code = ("import sys\n"
            "from megatron_moe import checkpointing\n"
            "def broken(*args, **kwargs):\n"
            "    raise KeyError('a bug of ours')\n"
            "checkpointing._sharded_state_dict = broken\n"
            "sys.argv = ['pretrain_gpt_moe.py'] + sys.argv[1:]\n"
            "import pretrain_gpt_moe\n"
            "sys.exit(pretrain_gpt_moe.main())\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", code, *TINY_MOE, "--train-iters", "3", "--load",
                             str(copy_of(saved, tmp_path))], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "KeyError: 'a bug of ours'" in result.stderr, result.stderr[-3000:]
    assert "damaged" not in result.stderr
