"""megatron-core's topk router options change training as they should: the z-loss is logged, a capacity
factor drops tokens, padding fills every expert to its capacity. One process, TINY_MOE, 3 iterations."""

import json
import re

from launcher import SCRIPTS, TINY_MOE, torchrun

ITERATIONS = 3
# TINY_MOE: micro batch 2 x 32 tokens, top-2 of 4 experts -> capacity ceil(64 x 2 / 4 x factor) = 32
TOKENS, TOPK, CAPACITY = 64, 2, 32


def routed_run(tmp_path, *flags):
    """(log lines of the iterations, tokens each router forward sent to each expert)."""
    out = tmp_path / "routed.json"
    result = torchrun(1, SCRIPTS / "routed_tokens.py", [str(out), "--train-iters", str(ITERATIONS), *TINY_MOE, *flags])
    log = [line for line in result.stdout.splitlines() if line.startswith(" iteration")]
    return log, json.loads(out.read_text())["tokens_per_expert"]


def logged(line, name):
    match = re.search(rf"\| {name}: ([0-9.E+-]+) \|", line)
    return None if match is None else float(match.group(1))


def test_z_loss_is_logged_and_capacity_drops_the_overflow(tmp_path):
    log, routed = routed_run(tmp_path, "--moe-z-loss-coeff", "1e-3", "--moe-expert-capacity-factor", "1.0",
                             "--moe-token-drop-policy", "probs")
    assert len(log) == ITERATIONS
    assert all(logged(line, "z loss") > 0 for line in log), log
    assert len(routed) == ITERATIONS * 4 * 4  # 4 micro batches x 4 MoE layers per iteration
    assert max(max(counts) for counts in routed) == CAPACITY
    dropped = [TOKENS * TOPK - sum(counts) for counts in routed]
    assert min(dropped) >= 0 and sum(dropped) > 0, dropped  # random routing overflows some expert


def test_padding_fills_every_expert_to_capacity(tmp_path):
    log, routed = routed_run(tmp_path, "--moe-expert-capacity-factor", "1.0", "--moe-pad-expert-input-to-capacity",
                             "--moe-token-drop-policy", "position")
    assert logged(log[-1], "z loss") is None and logged(log[-1], "load balancing loss") > 0
    assert all(counts == [CAPACITY] * 4 for counts in routed), routed[:4]
