"""Every parallel layout trains the same model as one process: same losses on the same global batches."""

import json

import pytest

from launcher import SCRIPTS, TINY_MOE, torchrun, train_losses

LAYOUTS = {
    "TP2": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "PP2": (2, ["--pipeline-model-parallel-size", "2"]),
    "EP2": (2, ["--expert-model-parallel-size", "2"]),
    "DP2": (2, []),
    "DP2-distributed-optimizer": (2, ["--use-distributed-optimizer"]),
    "TP2xEP2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2"]),
    "PP2xEP2": (4, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"]),
    # expert tensor parallelism apart from TP: whole experts on each TP rank ...
    "TP2xEP2-ETP1": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size",
                         "2", "--expert-tensor-parallel-size", "1"]),
    # ... experts split over two data-parallel ranks (megatron-core marks them expert-parallel only with EP > 1)
    "ETP2": (2, ["--expert-tensor-parallel-size", "2"]),
    # uneven stages: 1 layer on the first, 3 on the last
    "PP2-uneven": (2, ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"]),
    # interleaved 1F1B: two chunks of one layer per pipeline rank, overlapped reduction and gathering over DP=2
    "PP2xVPP2xDP2-overlap": (4, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
                                 "1", "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
                                 "--ddp-bucket-size", "5000"]),
    # small buckets: many asynchronous reductions launched from the backward hooks
    "DP2-overlap-grad-reduce": (2, ["--overlap-grad-reduce", "--ddp-bucket-size", "5000"]),
    "recompute-full-uniform": (1, ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                   "--recompute-num-layers", "1"]),
    "PP2-recompute-selective": (2, ["--pipeline-model-parallel-size", "2", "--recompute-granularity", "selective",
                                    "--recompute-modules", "core_attn", "moe"]),
}
ITERATIONS = 4


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    return train_losses(1, TINY_MOE, tmp_path_factory.mktemp("reference"), ITERATIONS)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_losses_equal_one_process(layout, reference_losses, tmp_path):
    nproc, flags = LAYOUTS[layout]
    losses = train_losses(nproc, TINY_MOE + flags, tmp_path, ITERATIONS)
    assert len(losses) == ITERATIONS
    # later iterations would differ if gradients were not synchronised (e.g. data parallel without
    # finalize_model_grads) or if any layout initialised the weights differently
    assert losses == pytest.approx(reference_losses, rel=1e-5), f"{layout}: {losses} vs {reference_losses}"
    assert losses[-1] < losses[0]


BIASED = [flag for flag in TINY_MOE if flag != "--disable-bias-linear"]


@pytest.fixture(scope="module")
def biased_reference(tmp_path_factory):
    return train_losses(1, BIASED, tmp_path_factory.mktemp("biased"), ITERATIONS)


@pytest.mark.parametrize("layout", [["--expert-model-parallel-size", "2"],
                                    ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                     "--expert-tensor-parallel-size", "1"]], ids=["EP2", "TP2-ETP1"])
def test_biased_experts_train_the_same(layout, biased_reference, reference_losses, tmp_path):
    """Megatron-LM's default: MoE models keep their linear biases (megatron-core adds the experts' fc2 bias in
    place, which one expert-parallel and expert-TP rank can do thanks to model.ExpertRowParallelLinear);
    megatron-core builds biased experts with an expert tensor-parallel size of 1 only, also under TP."""
    assert train_losses(2, BIASED + layout, tmp_path, ITERATIONS) == pytest.approx(biased_reference, rel=1e-5)
    assert biased_reference[1:] != pytest.approx(reference_losses[1:], rel=1e-5), \
        "the biases (zero at first) change the training"


def test_overlapped_param_gather_equals_one_process_and_leaves_parameters_gathered(reference_losses, tmp_path):
    """--overlap-param-gather defers the all-gather of updated parameters to the next forward: after the
    last step each rank holds only its own shard updated unless training ends by gathering them."""
    flags = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
             "--ddp-bucket-size", "5000"]
    prefix = tmp_path / "digest"
    torchrun(2, SCRIPTS / "train_params_digest.py", [str(prefix), "--train-iters", str(ITERATIONS), *TINY_MOE, *flags])
    ranks = [json.loads((tmp_path / f"digest.{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["losses"] == pytest.approx(reference_losses, rel=1e-5)
    assert ranks[0]["parameter_sums"] == ranks[1]["parameter_sums"]


@pytest.mark.parametrize("losses", [["--moe-router-type", "sam", "--sam-num-groups", "2"],
                                    ["--moe-z-loss-coeff", "0.001"]], ids=["sam-losses", "z-loss"])
def test_pipeline_stage_without_moe_layers_joins_the_aux_loss_reduction(losses, tmp_path):
    """The first stage holds only dense layers, so it tracks no MoE loss; without joining the collective
    reduction of the logged losses it would leave the other stage waiting until the timeout."""
    flags = TINY_MOE + ["--moe-layer-freq", "[0,0,1,1]", *losses]
    one = train_losses(1, flags, tmp_path, 3)
    two = train_losses(2, flags + ["--pipeline-model-parallel-size", "2", "--distributed-timeout-minutes", "1"],
                       tmp_path, 3)
    assert two == pytest.approx(one, rel=1e-5)


def test_bf16_follows_the_fp32_losses(reference_losses, tmp_path):
    """--bf16 converts every parameter, as Megatron-LM's Float16Module does (megatron-core creates the learned
    position embedding in fp32 whatever params_dtype says), and trains the same model within bf16 precision."""
    losses = train_losses(1, TINY_MOE + ["--bf16"], tmp_path, ITERATIONS)
    assert losses == pytest.approx(reference_losses, rel=2e-2)
    assert losses[-1] < losses[0]
