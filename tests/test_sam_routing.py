"""SAM routing: the one-copy dispatcher equals one process (also with expert tensor parallelism, equal to TP
or not), sends one row per token in one token all-to-all per direction (packed bit-exactly), k=1 is Switch,
trains."""

import pytest
import torch
import torch.nn.functional as F

from launcher import SCRIPTS, TINY_MOE, torchrun, train_losses
from megatron_moe.arguments import ConfigError, parse_args
from megatron_moe.moe.sam import sam_losses, sam_route

TOKENS = 48
# One MoE layer, 8 experts in 4 groups of 2, no aux losses (they average over each rank's tokens, so a
# split batch would not match one process; the training parity test covers them).
LAYER = TINY_MOE + ["--num-layers", "1", "--num-experts", "8", "--moe-router-type", "sam", "--sam-num-groups", "4",
                    "--sam-group-balance-loss-coeff", "0", "--sam-expert-balance-loss-coeff", "0",
                    "--sam-alignment-loss-coeff", "0", "--train-iters", "1"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
GROUP_LIMITED = TINY_MOE + ["--num-layers", "1", "--num-experts", "8", "--moe-aux-loss-coeff", "0",
                            "--moe-router-num-groups", "2", "--moe-router-group-topk", "1", "--train-iters", "1"]


def run_layer(tmp_path, nproc, flags):
    """Per-rank results of tests/scripts/moe_layer_step.py, concatenated in rank order."""
    torchrun(nproc, SCRIPTS / "moe_layer_step.py", [str(tmp_path), str(TOKENS), *flags])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(nproc)]
    merged = {key: torch.cat([r[key] for r in ranks]) for key in ("tokens", "output", "input_grad", "eval_output")}
    merged["router_grad"] = ranks[0]["router_grad"]
    merged["router_weight"] = ranks[0]["router_weight"]
    merged["experts"] = {i: w for r in ranks for i, w in r["experts"].items()}
    merged["rows"] = sum(c["rows"] for r in ranks for c in r["counts"].values())
    merged["tokens_counted"] = sum(c["tokens"] for r in ranks for c in r["counts"].values())
    merged["bytes"] = sum(c["bytes"] for r in ranks for c in r["counts"].values())
    merged["collectives"] = [r["collectives"] for r in ranks]
    return merged


def all_to_alls(calls):
    return [dtype for name, dtype in calls if name == "alltoall_base_"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_layer(tmp_path_factory.mktemp("sam_reference"), 1, LAYER + ["--moe-router-topk", "2"])


# moe_layer_step gives every rank its own tokens: under TP x EP that is each TP rank's sequence shard
@pytest.mark.parametrize("nproc,layout", [
    (2, ["--expert-model-parallel-size", "2"]),
    (4, ["--expert-model-parallel-size", "4"]),
    (4, TP2 + ["--expert-model-parallel-size", "2"]),
    (4, TP2 + ["--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"]),
], ids=["EP2", "EP4", "TP2xEP2", "TP2xEP2-ETP1"])
def test_layer_equals_one_process_and_sends_each_token_once(nproc, layout, reference, tmp_path):
    result = run_layer(tmp_path, nproc, LAYER + ["--moe-router-topk", "2", *layout])
    assert torch.equal(result["tokens"], reference["tokens"])
    torch.testing.assert_close(result["output"], reference["output"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["input_grad"], reference["input_grad"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["router_grad"], reference["router_grad"], rtol=1e-5, atol=1e-6)
    assert result["output"].abs().sum() > 0 and result["router_grad"].abs().sum() > 0
    assert result["tokens_counted"] == TOKENS
    assert result["rows"] == TOKENS  # one row per token at k = 2
    torch.testing.assert_close(result["eval_output"], reference["output"], rtol=1e-5, atol=1e-6)
    for calls in result["collectives"]:
        # one token all-to-all per direction: dispatch = packed bytes, combine = fp32 rows; backward mirrors
        assert all_to_alls(calls["forward"]) == [torch.uint8, torch.float32]
        assert all_to_alls(calls["backward"]) == [torch.float32, torch.uint8]
        # the split sizes: one all-gather of counts per forward (over TP x EP), nothing else on the EP side
        assert [c for c in calls["forward"] if c[1] == torch.int64] == [("_allgather_base_", torch.int64)]
        if "--tensor-model-parallel-size" not in layout or "--expert-tensor-parallel-size" in layout:
            # no expert-TP all-gather / reduce-scatter (expert TP = 1)
            assert len(calls["forward"]) == 3 and len(calls["backward"]) == 2


def test_capacity_factor_drops_the_weakest_tokens_of_each_group_in_training_only(reference, tmp_path):
    # 24 tokens per rank, 4 groups, factor 0.5: each rank routes at most 3 tokens to each group
    result = run_layer(tmp_path, 2, LAYER + ["--moe-router-topk", "2", "--expert-model-parallel-size", "2",
                                             "--sam-capacity-factor", "0.5"])
    x = result["tokens"].reshape(TOKENS, -1)
    p, group, _, gates = sam_route(x @ result["router_weight"].T, num_groups=4, topk=2, renormalize=False)
    output = result["output"].reshape(TOKENS, -1)
    kept = output.abs().sum(-1) > 0
    for rank in (0, 1):
        for g in range(4):
            mine = torch.zeros(TOKENS, dtype=torch.bool)
            mine[rank * 24:(rank + 1) * 24] = True
            in_group = mine & (group == g)
            assert int((in_group & kept).sum()) == min(3, int(in_group.sum()))
            if (in_group & ~kept).any():  # every token dropped scores below every token kept
                assert gates[in_group & ~kept].sum(-1).max() <= gates[in_group & kept].sum(-1).min()
    assert 0 < int(kept.sum()) < TOKENS and result["rows"] == int(kept.sum())
    torch.testing.assert_close(output[kept], reference["output"].reshape(TOKENS, -1)[kept], rtol=1e-5, atol=1e-6)
    assert result["input_grad"].reshape(TOKENS, -1)[~kept].abs().sum() == 0  # dropped: no MoE gradient
    # evaluation never drops: it equals the dropless layer
    torch.testing.assert_close(result["eval_output"], reference["output"], rtol=1e-5, atol=1e-6)


def test_megatron_group_limited_alltoall_sends_k_rows_per_token(tmp_path):
    result = run_layer(tmp_path, 2, GROUP_LIMITED + ["--moe-router-topk", "2", "--expert-model-parallel-size", "2"])
    assert result["tokens_counted"] == TOKENS
    assert result["rows"] == 2 * TOKENS
    for calls in result["collectives"]:  # hidden states and probs in two dispatch all-to-alls, then combine
        assert len(all_to_alls(calls["forward"])) == 3 and len(all_to_alls(calls["backward"])) == 3


def _swiglu_expert(weights, x):
    gate, up = (x @ weights["linear_fc1.weight"].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ weights["linear_fc2.weight"].T


def test_top1_with_one_expert_per_group_is_a_switch_layer(tmp_path):
    result = run_layer(tmp_path, 1, LAYER + ["--sam-num-groups", "8", "--moe-router-topk", "1"])
    x = result["tokens"].reshape(TOKENS, -1)
    # Switch Transformer: softmax over experts, the top-1 expert's output scaled by its probability
    probs = torch.softmax(x @ result["router_weight"].T, dim=-1)
    gate, expert = probs.max(dim=-1)
    expected = torch.stack([gate[t] * _swiglu_expert(result["experts"][int(expert[t])], x[t]) for t in range(TOKENS)])
    torch.testing.assert_close(result["output"].reshape(TOKENS, -1), expected, rtol=1e-5, atol=1e-6)
    assert result["rows"] == TOKENS  # one row per token at k = 1 too


# SAM's three aux losses are on (their default coefficients): under sequence parallelism each TP rank
# routes half of every sequence, and the losses must still be those of the whole micro batch.
PRETRAIN = TINY_MOE + ["--moe-router-type", "sam", "--sam-num-groups", "2"]


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory):
    return train_losses(1, PRETRAIN, tmp_path_factory.mktemp("sam_pretrain"), 4)


@pytest.mark.parametrize("nproc,layout", [
    (2, ["--expert-model-parallel-size", "2"]),
    (2, TP2),
    (4, TP2 + ["--expert-model-parallel-size", "2"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
], ids=["EP2", "TP2", "TP2xEP2", "PP2"])
def test_pretraining_with_sam_learns_and_equals_one_process(nproc, layout, one_process_losses, tmp_path):
    losses = train_losses(nproc, PRETRAIN + layout, tmp_path, 4)
    assert losses == pytest.approx(one_process_losses, rel=1e-5)
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------- in process


def test_route_picks_the_heaviest_group_then_its_top_experts():
    # group 0 = experts 0,1 (sum .49); group 1 = experts 2,3 (sum .51): the single best expert (0) loses
    p = torch.tensor([[0.44, 0.05, 0.27, 0.24]])
    _, group, experts, gates = sam_route(p.log(), num_groups=2, topk=2, renormalize=False)
    assert group.tolist() == [1] and experts.tolist() == [[2, 3]]
    torch.testing.assert_close(gates, torch.tensor([[0.27, 0.24]]))
    _, _, _, renormalized = sam_route(p.log(), num_groups=2, topk=2, renormalize=True)
    torch.testing.assert_close(renormalized, torch.tensor([[0.27 / 0.51, 0.24 / 0.51]]))


def test_losses_are_one_when_balanced_and_alignment_penalises_outranking_experts():
    uniform = torch.full((4, 4), 0.25)
    group = torch.tensor([0, 0, 1, 1])
    experts = torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3]])
    g, e, a = sam_losses(uniform, group, experts, 2, torch.ones(4))
    assert (g.item(), e.item(), a.item()) == pytest.approx((1.0, 1.0, 0.0))
    p = torch.tensor([[0.5, 0.0, 0.3, 0.2]])  # chose group 1 (experts 2, 3) although expert 0 is best
    _, _, a = sam_losses(p, torch.tensor([1]), torch.tensor([[2, 3]]), 2, torch.ones(1))
    assert a.item() == pytest.approx(0.5 - 0.2)


def test_losses_backpropagate_to_the_router_logits():
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    p, group, experts, _ = sam_route(logits, num_groups=4, topk=2, renormalize=False)
    for loss in sam_losses(p, group, experts, 4, torch.ones(16)):
        (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
        assert grad.abs().sum() > 0


BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--train-iters", "1", "--lr", "1e-3", "--mock-data",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
        "--moe-router-type", "sam", "--num-experts", "8"]


@pytest.mark.parametrize("flags,world,message", [
    (["--sam-num-groups", "3"], 1, "must divide --num-experts"),
    (["--sam-num-groups", "2", "--expert-model-parallel-size", "4"], 4, "multiple of --expert-model-parallel-size"),
    (["--sam-num-groups", "4", "--moe-router-topk", "3"], 1, "exceeds the 2 experts"),
    (["--moe-router-num-groups", "2"], 1, "use --sam-num-groups"),
    (["--sam-capacity-factor", "0"], 1, "must be > 0"),
])
def test_bad_flags_are_one_line_errors(flags, world, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(BASE + flags, world_size=world)


def test_groups_default_to_the_expert_parallel_size():
    args = parse_args(BASE + ["--expert-model-parallel-size", "2"], world_size=2)
    assert args.sam_num_groups == 2


def test_loss_shares_of_sequence_shards_add_up_to_the_whole_batch_loss(monkeypatch):
    """Under sequence parallelism each rank sums the token counts over its group and keeps its own sums of p."""
    from megatron_moe.moe import sam

    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    p, group, experts, _ = sam_route(logits, num_groups=4, topk=2, renormalize=False)
    valid = torch.ones(16)
    shards = [(p[:7], group[:7], experts[:7], valid[:7]), (p[7:], group[7:], experts[7:], valid[7:])]
    local_counts = []
    monkeypatch.setattr(sam, "_summed_over", lambda counts, group: local_counts.append(counts) or counts)
    for shard_p, shard_group, shard_experts, shard_valid in shards:
        sam_losses(shard_p, shard_group, shard_experts, 4, shard_valid, reduce_group="tp")
    monkeypatch.setattr(sam, "_summed_over", lambda counts, group: sum(local_counts))
    shares = [sam_losses(*shard[:3], 4, shard[3], reduce_group="tp") for shard in shards]
    monkeypatch.undo()
    whole = sam_losses(p, group, experts, 4, valid)
    for index, loss in enumerate(whole):
        torch.testing.assert_close(shares[0][index] + shares[1][index], loss)
        assert shares[0][index] != loss  # one shard alone is not the whole batch


class _OneRank:
    """A process group of one rank (megatron's all_to_all then moves nothing: pack and unpack remain)."""

    def size(self):
        return 1


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_local_experts", [256, 300])
def test_packed_rows_are_bit_exact_and_carry_gate_gradients_back(hidden_dtype, num_local_experts):
    from megatron_moe.moe import packed_rows

    generator = torch.Generator().manual_seed(3)
    rows, topk = 10, 3

    def random_bits(dtype, *shape):  # every bit pattern: NaN payloads, infinities, subnormals, -0
        size = torch.empty(0, dtype=dtype).element_size()
        return torch.randint(0, 256, (*shape, size), dtype=torch.uint8, generator=generator).view(dtype).squeeze(-1)

    hidden = random_bits(hidden_dtype, rows, 7)  # 7 columns: an odd byte width for 2-byte dtypes
    gates = random_bits(torch.float32, rows, topk)
    ids_dtype = packed_rows.id_dtype(num_local_experts)
    ids = torch.randint(0, num_local_experts, (rows, topk), generator=generator).to(ids_dtype)
    ids[0, 0] = num_local_experts - 1
    packed, layout = packed_rows.pack([hidden, gates, ids])
    assert packed.dtype == torch.uint8 and packed.shape[1] == packed_rows.row_bytes([hidden, gates, ids])
    for original, back in zip([hidden, gates, ids], packed_rows.unpack(packed, layout, [(7,), (topk,), (topk,)])):
        assert back.dtype == original.dtype and torch.equal(back.view(torch.uint8), original.view(torch.uint8))

    # autograd: outputs equal the inputs, the gradients come back bit-exactly, ids get none
    hidden_in = torch.randn(rows, 7, generator=generator).to(hidden_dtype).requires_grad_(True)
    gates_in = torch.rand(rows, topk, generator=generator).requires_grad_(True)
    out_hidden, out_gates, out_ids = packed_rows.all_to_all(_OneRank(), (hidden_in, gates_in, ids), [rows], [rows])
    assert torch.equal(out_hidden, hidden_in) and torch.equal(out_gates, gates_in) and torch.equal(out_ids, ids)
    assert not out_ids.requires_grad
    grad_hidden, grad_gates = random_bits(hidden_dtype, rows, 7), random_bits(torch.float32, rows, topk)
    torch.autograd.backward([out_hidden, out_gates], [grad_hidden, grad_gates])
    assert torch.equal(hidden_in.grad.view(torch.uint8), grad_hidden.view(torch.uint8))
    assert torch.equal(gates_in.grad.view(torch.uint8), grad_gates.view(torch.uint8))


def test_id_dtype_holds_every_local_expert_id():
    from megatron_moe.moe.packed_rows import id_dtype

    assert id_dtype(256) == torch.uint8 and torch.iinfo(id_dtype(257)).max >= 2**31 - 1
