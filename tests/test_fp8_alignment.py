"""FP8-aligned dispatch: under --fp8-format every local expert's row count is a multiple of 16 (BASE and SAM
dispatchers pad themselves, topk with --moe-router-padding-for-fp8 as in Megatron-LM), and the padded layer
computes exactly what the unpadded one does. FP8 itself needs a GPU and Transformer Engine: the experts are
a stand-in matrix product that asserts the alignment (tests/scripts/fp8_aligned_layers.py)."""

import pytest
import torch

from launcher import SCRIPTS, TINY_MOE, torchrun
from megatron_moe.host_sync import HostSyncCounter
from megatron_moe.moe.expert_padding import ExpertRowPadding

VARIANTS = ("topk", "base", "base-no-shuffle", "sam", "sam-capacity")


def test_padding_puts_zero_rows_after_each_expert_and_unpad_restores_the_rows_without_a_host_sync():
    rows = torch.arange(7 * 2, dtype=torch.float32).view(7, 2)
    padding = ExpertRowPadding(16)
    with HostSyncCounter() as counter:
        padded_rows, padded_gates, counts = padding.pad(rows, torch.ones(7), [3, 0, 4])
        restored = padding.unpad(padded_rows)
    assert counter.num_syncs == 0, counter.describe()
    assert counts == [16, 0, 16] and padded_rows.shape == (32, 2)
    assert torch.equal(padded_rows[:3], rows[:3]) and torch.equal(padded_rows[16:20], rows[3:])
    assert padded_gates.sum() == 7 and padded_rows[3:16].abs().sum() == 0 and padded_rows[20:].abs().sum() == 0
    assert torch.equal(restored, rows)


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8")
    torchrun(2, SCRIPTS / "fp8_aligned_layers.py", [str(out), *TINY_MOE, "--num-layers", "1", "--train-iters", "1",
                                                     "--expert-model-parallel-size", "2"])
    return [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_aligned_layer_gives_the_same_output_and_gradients(layers, variant):
    for rank, result in enumerate(layers):
        record = result[variant]
        assert all(count % 16 == 0 for rows in record["aligned_rows"] for count in rows), record["aligned_rows"]
        assert any(count % 16 for rows in record["reference_rows"] for count in rows), "nothing needed padding"
        assert record["differences"] == {name: 0.0 for name in record["scales"]}, (rank, record)
        assert all(scale > 0 for scale in record["scales"].values()), record["scales"]


def test_base_dispatcher_needs_no_sync_after_an_evaluation_forward(layers):
    """megatron's dispatcher only ever moves its sync point earlier; BASE resets it for balanced forwards."""
    assert [result["base_sync_point_after_eval_then_train"] for result in layers] == ["no_sync", "no_sync"]


FP8 = ["--fp8-format", "e4m3", "--transformer-impl", "transformer_engine"]


@pytest.mark.parametrize("flags, message", [
    ([], "--moe-router-padding-for-fp8 pads for FP8 GEMMs: it needs --fp8-format"),
    (FP8 + ["--moe-token-dispatcher-type", "allgather"], "needs --moe-token-dispatcher-type alltoall"),
    (FP8 + ["--moe-router-type", "base", "--moe-router-topk", "1", "--moe-aux-loss-coeff", "0"],
     "does not apply to --moe-router-type base"),
    (FP8 + ["--moe-router-type", "sam"], "does not apply to --moe-router-type sam"),
])
def test_router_padding_flag_is_refused_where_it_cannot_act(flags, message):
    from megatron_moe.arguments import ConfigError, parse_args

    with pytest.raises(ConfigError, match=message):
        parse_args(TINY_MOE + ["--train-iters", "1", "--moe-router-padding-for-fp8", *flags])


def test_router_padding_flag_reaches_megatron_as_megatron_lm_passes_it(monkeypatch):
    from megatron.core.transformer import transformer_config

    from megatron_moe.arguments import parse_args
    from megatron_moe.model import transformer_config_from_args

    monkeypatch.setattr(transformer_config, "is_te_min_version", lambda version: True)  # MoE FP8 asks for TE
    args = parse_args(TINY_MOE + ["--train-iters", "1", "--moe-router-padding-for-fp8", *FP8])
    config = transformer_config_from_args(args)
    assert config.moe_router_padding_for_fp8 and config.moe_router_padding_for_quantization and config.fp8 == "e4m3"
    assert not parse_args(TINY_MOE + ["--train-iters", "1"]).moe_router_padding_for_fp8  # Megatron-LM's default
