"""The model does not depend on the layout through its padded vocabulary.

Megatron pads the vocabulary to a multiple of make-vocab-size-divisible-by x TP: with 256 NullTokenizer
tokens + EOD (257), TP=1 has 384 rows and TP=2 512. The padded rows' logits are masked, so both give the
one-process losses, and a TP=1 checkpoint resumed under TP=2 (which keeps the checkpoint's 384 rows) gives
the losses of continuing under TP=1.
"""

import json
import shutil

import pytest

from launcher import SCRIPTS, TINY_MOE, torchrun, train_losses
from megatron_moe.arguments import padded_vocab_size, parse_args

VOCAB_257 = TINY_MOE + ["--vocab-size", "256", "--lr-decay-iters", "10"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]


def test_the_two_layouts_pad_differently():
    one, two = parse_args(VOCAB_257 + ["--train-iters", "1"]), parse_args(VOCAB_257 + ["--train-iters", "1"] + TP2,
                                                                          world_size=2)
    assert (padded_vocab_size(257, one), padded_vocab_size(257, two)) == (384, 512)


def test_tensor_parallel_losses_equal_one_process(tmp_path):
    one = train_losses(1, VOCAB_257, tmp_path, 3)
    two = train_losses(2, VOCAB_257 + TP2, tmp_path, 3)
    assert two == pytest.approx(one, rel=1e-5), f"TP2 {two} vs TP1 {one}"


def test_tensor_parallel_one_checkpoint_resumes_under_two(tmp_path):
    straight = train_losses(1, VOCAB_257 + ["--save", str(tmp_path / "one"), "--save-interval", "2"], tmp_path, 4)
    at2 = tmp_path / "at2"
    shutil.copytree(tmp_path / "one" / "iter_0000002", at2 / "iter_0000002")
    (at2 / "latest_checkpointed_iteration.txt").write_text("2")
    out = tmp_path / "resumed.json"
    torchrun(2, SCRIPTS / "train_losses.py", [str(out), "--train-iters", "4", *VOCAB_257, *TP2, "--load", str(at2)])
    resumed = json.loads(out.read_text())
    assert resumed == pytest.approx(straight[2:], rel=1e-5), f"TP1 -> TP2 {resumed} vs TP1 {straight[2:]}"
