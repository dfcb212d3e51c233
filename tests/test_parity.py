"""Every parallel layout trains the same model as one process: same losses on the same global batches."""

import pytest

from launcher import TINY_MOE, train_losses

LAYOUTS = {
    "TP2": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "PP2": (2, ["--pipeline-model-parallel-size", "2"]),
    "EP2": (2, ["--expert-model-parallel-size", "2"]),
    "DP2": (2, []),
    "DP2-distributed-optimizer": (2, ["--use-distributed-optimizer"]),
    "TP2xEP2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2"]),
    "PP2xEP2": (4, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"]),
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
