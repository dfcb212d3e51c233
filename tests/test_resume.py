"""Exact resume: a run killed after a checkpoint and resumed gives the losses of an uninterrupted run.

8 iterations, checkpoint every 5: run A trains 1..8 and is SIGKILLed right after iteration 8, before its
final save, so the tracker still names iteration 5 (a half-written later checkpoint directory is added
and must be ignored). Run B resumes from 5 and trains 6..8. Its losses must equal A's 5..8 as floats
(bit-exact, CPU fp32): this needs model, optimizer (incl. AdamW's step), scheduler, RNG and data
position restored. Dropout is on in the tensor-parallel cases, so the RNG restore is exercised.
"""

import json
import re

import pytest

from launcher import SCRIPTS, TINY_MOE, torchrun

ITERATIONS, SAVE_INTERVAL = 8, 5
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"] + DROPOUT
EP2 = ["--expert-model-parallel-size", "2"]
CASES = {
    "TP2-dropout": TP2,
    "TP2-dropout-distributed-optimizer": TP2 + ["--use-distributed-optimizer"],
    "EP2": EP2,
    "EP2-distributed-optimizer": EP2 + ["--use-distributed-optimizer"],
    "EP2-distributed-optimizer-fully-reshardable": EP2 + ["--use-distributed-optimizer",
                                                         "--dist-ckpt-optim-fully-reshardable"],
    # whole experts on both tensor-parallel ranks
    "TP2-ETP1-dropout": TP2 + ["--expert-tensor-parallel-size", "1"],
    # two model chunks per pipeline rank (checkpoint keys model0, model1)
    "PP2xVPP2-distributed-optimizer": ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
                                       "1", "--use-distributed-optimizer"],
}


def run(tmp_path, name, flags, kill_after=0, stdout=None):
    """The run's lm losses; its output is appended to the list ``stdout`` if given."""
    out = tmp_path / f"{name}.json"
    result = torchrun(2, SCRIPTS / "train_and_kill.py",
                      [str(out), str(kill_after), *TINY_MOE, *flags, "--train-iters", str(ITERATIONS)],
                      check=kill_after == 0)
    if kill_after:
        assert result.returncode != 0, "the killed run should have failed"
    if stdout is not None:
        stdout.append(result.stdout)
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_killed_and_resumed_run_matches_uninterrupted(case, tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = CASES[case] + ["--save", str(ckpt), "--load", str(ckpt), "--save-interval", str(SAVE_INTERVAL)]
    straight = run(tmp_path, "killed", flags, kill_after=ITERATIONS)
    assert len(straight) == ITERATIONS
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(SAVE_INTERVAL)
    assert not (ckpt / f"iter_{ITERATIONS:07d}").exists(), "the kill came before the final save"
    (ckpt / "iter_0000007").mkdir()  # a crash mid-save: the tracker does not name it, so it is ignored
    (ckpt / "iter_0000007" / "common.pt").write_bytes(b"truncated")

    logs = []
    resumed = run(tmp_path, "resumed", flags, stdout=logs)
    assert resumed == straight[SAVE_INTERVAL:], f"{case}: resumed {resumed} vs straight {straight[SAVE_INTERVAL:]}"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(ITERATIONS)
    # Megatron-LM's lines around a load (rank 0's tensor and pipeline rank), then its timer line
    lines = logs[0].splitlines()
    start = lines.index(f" loading distributed checkpoint from {ckpt} at iteration {SAVE_INTERVAL}")
    tp, pp = (2 if "--tensor-model-parallel-size" in flags else 1), (2 if "--pipeline-model-parallel-size" in flags else 1)
    assert f"  successfully loaded checkpoint from {ckpt} [ t 1/{tp}, p 1/{pp} ] at iteration {SAVE_INTERVAL}" in \
        lines[start:], lines[start:start + 6]
    timer = lines.index("(min, max) time across ranks (ms):", start)
    assert re.fullmatch(r"    load-checkpoint \.+: \([\d.]+, [\d.]+\)", lines[timer + 1]), lines[timer + 1]


def test_saving_does_not_change_training(tmp_path):
    """The checkpointed run above is itself the uninterrupted reference: it must equal a run that never saves."""
    flags = CASES["TP2-dropout-distributed-optimizer"]
    ckpt = tmp_path / "ckpt"
    saving = run(tmp_path, "saving", flags + ["--save", str(ckpt), "--save-interval", "2"])
    assert saving == run(tmp_path, "plain", flags)
