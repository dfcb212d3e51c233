"""Host syncs of a whole training iteration (forward, backward, optimizer, logging), counted with
HostSyncCounter on 2 ranks with EP=2, for each router: none in our code on an iteration that does not log,
except one per dispatch where the split sizes depend on the data (SAM), and the BASE solver's own (listed
apart, issue 17). Every remaining site, ours and megatron-core's, is listed in docs/host_syncs.md."""

import json
import re
from collections import Counter

import pytest

from launcher import REPO, SCRIPTS, TINY_MOE, torchrun
from megatron_moe.host_sync import CPU_COMPAT, MEGATRON_CORE, OTHER, OURS

# 2 MoE layers x 2 micro batches per rank (global batch 8 = 2 x micro batch 2 x DP 2): 4 dispatches per step.
FLAGS = TINY_MOE + ["--num-layers", "2", "--expert-model-parallel-size", "2", "--train-iters", "5",
                    "--log-interval", "2"]
DISPATCHES = 4
NON_LOG, LOG = 3, 4
ROUTERS = {
    "topk": ["--moe-router-type", "topk"],
    "sam": ["--moe-router-type", "sam"],
    "base": ["--moe-router-type", "base", "--moe-router-topk", "1", "--moe-aux-loss-coeff", "0"],
    "base-no-shuffle": ["--moe-router-type", "base", "--moe-router-topk", "1", "--moe-aux-loss-coeff", "0",
                        "--no-base-shuffle"],
}
# What a log iteration reads: the losses (one read for the interval), the MoE losses (one read), the
# dispatchers' traffic counters (the layer count, then the table).
LOG_READS = {"megatron_moe/training.py in read", "megatron_moe/metrics.py in moe_aux_losses",
             "megatron_moe/moe/comm_stats.py in snapshot_and_reset"}
SAM_SPLITS = "megatron_moe/moe/sam.py in _settle_splits"


def site(sync) -> str:
    """'file in function', without the line number (docs/host_syncs.md gives it)."""
    return re.sub(r":\d+ in ", " in ", sync["where"])


@pytest.fixture(scope="module", params=list(ROUTERS))
def counted(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("syncs") / f"{request.param}.json"
    torchrun(2, SCRIPTS / "step_host_syncs.py", [str(out), f"{NON_LOG},{LOG}", *FLAGS, *ROUTERS[request.param]])
    iterations = json.loads(out.read_text())["iterations"]
    for iteration in (NON_LOG, LOG):
        print(f"{request.param}, iteration {iteration}:\n{iterations[str(iteration)]['description']}")
    return request.param, {int(i): record["syncs"] for i, record in iterations.items()}


def ours(syncs):
    return Counter(site(s) for s in syncs if s["origin"] == OURS)


def test_a_step_that_does_not_log_syncs_only_where_split_sizes_depend_on_the_data(counted):
    router, syncs = counted
    expected = Counter({SAM_SPLITS: DISPATCHES}) if router == "sam" else Counter()
    assert ours(syncs[NON_LOG]) == expected, router  # BASE's balanced assignment included: it never syncs


def test_a_log_iteration_adds_one_read_per_logged_quantity(counted):
    router, syncs = counted
    reads = ours(syncs[LOG]) - ours(syncs[NON_LOG])
    expected = Counter({"megatron_moe/training.py in read": 1, "megatron_moe/moe/comm_stats.py in snapshot_and_reset": 2})
    if router in ("topk", "sam"):  # they track auxiliary losses; BASE has none
        expected["megatron_moe/metrics.py in moe_aux_losses"] = 1
    assert reads == expected, router
    assert set(reads) <= LOG_READS


def test_every_sync_has_an_origin_and_the_cpu_adaptations_serve_megatron_core(counted):
    _, syncs = counted
    for sync in syncs[NON_LOG] + syncs[LOG]:
        assert sync["origin"] != OTHER, sync
        if sync["origin"] == CPU_COMPAT:
            assert sync["called_from"].startswith("megatron/core/"), sync


def test_docs_list_every_remaining_site(counted):
    """docs/host_syncs.md names each site (file:line in function) of ours and megatron-core's."""
    _, syncs = counted
    listed = {re.sub(r":\d+ in ", " in ", entry)
              for entry in re.findall(r"`([\w/.]+\.py:\d+ in [\w<>]+)`", (REPO / "docs" / "host_syncs.md").read_text())}
    for sync in syncs[NON_LOG] + syncs[LOG]:
        if sync["origin"] in (OURS, MEGATRON_CORE):
            assert site(sync) in listed, f"{sync['where']} is not in docs/host_syncs.md"
