"""--context-parallel-size: refused on the local spec (megatron-core's local attention has no context
parallelism), checked against the sequence length, and on the Transformer Engine path each rank keeps its
balanced part of every sequence while the loss stays the mean over whole sequences. The Transformer Engine
attention itself needs a GPU: not run here."""

import re

import pytest
import torch

from launcher import SCRIPTS, TINY_MOE, torchrun
from megatron_moe.arguments import ConfigError, parse_args

TE = ["--transformer-impl", "transformer_engine"]


def args_with(*flags, world_size):
    return parse_args(TINY_MOE + ["--train-iters", "1", *flags], world_size=world_size)


@pytest.mark.parametrize("flags, world_size, message", [
    (["--context-parallel-size", "2"], 2,
     "--context-parallel-size needs --transformer-impl transformer_engine"),
    (TE + ["--context-parallel-size", "3"], 3, "--seq-length 32 must be a multiple of 2 x --context-parallel-size 3"),
    (TE + ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"], 2,
     "world size 2 is not divisible by tensor x context x pipeline parallel = 2 x 2 x 1"),
])
def test_bad_context_parallel_layouts_are_one_line_errors(flags, world_size, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        args_with(*flags, world_size=world_size)
    assert "\n" not in str(error.value)


def test_data_parallel_size_leaves_out_context_parallel_ranks():
    args = args_with(*TE, "--context-parallel-size", "2", "--expert-model-parallel-size", "2", world_size=4)
    # experts span context and data parallel ranks (megatron-core: world size / (ETP x EP x PP))
    assert (args.data_parallel_size, args.num_microbatches) == (2, 2)


def test_each_rank_keeps_two_balanced_chunks_and_the_loss_is_the_whole_sequences_mean(tmp_path):
    cp = 2
    torchrun(cp, SCRIPTS / "context_parallel_batch.py", [str(tmp_path)])
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(cp)]
    full = ranks[0]["full"]
    seq, chunk = full["tokens"].shape[1], full["tokens"].shape[1] // (2 * cp)
    for rank, result in enumerate(ranks):
        # rank r keeps chunks r and 2 CP - 1 - r of the 2 CP chunks (causal attention: equal work per rank)
        kept = torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                          torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)])
        for key, value in full.items():
            assert torch.equal(result["part"][key], value[:, kept]), (rank, key)
    mask, per_token = full["loss_mask"], full["per_token_loss"]
    whole_mean = (per_token * mask).sum() / mask.sum()
    assert [float(r["part"]["loss_mask"].sum()) for r in ranks] != [float(mask.sum()) / cp] * cp, \
        "the ranks should hold different numbers of loss tokens"
    for result in ranks:
        torch.testing.assert_close(result["reported"], whole_mean)
    # megatron-core multiplies each rank's loss by CP and divides its gradient by CP (the reduction over
    # data x context parallel ranks): the ranks' gradients add up to that of the whole mean
    torch.testing.assert_close(sum(r["loss"] for r in ranks), whole_mean)
