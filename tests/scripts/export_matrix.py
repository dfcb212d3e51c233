"""python tests/scripts/export_matrix.py OUT.json WORK_DIR CASES.json: for each named case (training flags),
in this one process: build the model, give its norm weights and expert biases random values (their initial
ones, 1 and 0, would hide a swapped or dropped tensor), save it, take its evaluation-mode logits on fixed
tokens, export it (in process), load the folder with transformers and compare; then import the folder
back, export that again and compare once more.

CASES.json: {"job": flags every case trains with, "cases": {name: {"flags": its own flags}}}. Writes
{case: {"refused": message} or {"class", "diff", "load_diff",
"round_trip_class", "round_trip_diff", "loading_info", "zero_sized", "unknown_fields"}}: the exported
folder's logits, the imported checkpoint's under --load --finetune (the job's flags and the flags the import
printed: the folder alone decides the model), the re-export's; what transformers reports missing, unexpected
or mismatched when it loads the folder, the tensors with a zero dimension, the config.json fields its config
class does not define."""

import contextlib
import io
import json
import sys
from pathlib import Path

import torch
import transformers
from megatron.core import parallel_state

from megatron_moe import checkpointing
from megatron_moe.conversion.hf_export import export
from megatron_moe.conversion.hf_files import safetensors_header
from megatron_moe.conversion.hf_import import import_hf
from megatron_moe.conversion.hf_layout import ConversionError, architecture
from megatron_moe.training import setup

TOKENS = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
# config.json fields transformers 5 reads besides its config classes' fields, for older readers
LEGACY_FIELDS = {"rope_theta", "partial_rotary_factor", "torch_dtype"}


def hf_logits(folder: Path):
    """(class name, logits on TOKENS, what would keep a serving engine from loading the folder as its class)."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                                    trust_remote_code=True, output_loading_info=True)
    with torch.no_grad():
        logits = model.eval()(TOKENS).logits
    config = json.loads((folder / "config.json").read_text())
    arch = architecture(config["architectures"][0])
    defined = set(type(model.config)().to_dict()) | LEGACY_FIELDS | arch.reads
    if arch.remote_code:
        defined.add("auto_map")
    sizes = {}
    for shard in folder.glob("*.safetensors"):
        sizes.update({name: shape for name, (shape, _, _) in safetensors_header(shard).items()})
    return type(model).__name__, logits, {
        "loading_info": {key: sorted(map(str, info[key])) for key in ("missing_keys", "unexpected_keys",
                                                                      "mismatched_keys")},
        "zero_sized": sorted(name for name, shape in sizes.items() if 0 in shape),
        "unknown_fields": sorted(set(config) - defined)}


@torch.no_grad()
def randomise_vectors(model) -> None:
    """Norm weights around 1 and expert biases around 0, drawn per tensor name."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        generator = torch.Generator().manual_seed(len(name) * 7919 + sum(map(ord, name)))
        if tensor.dim() == 1 and "norm" in name:
            tensor.copy_(1 + 0.3 * torch.randn(tensor.shape, generator=generator))
        elif name.endswith("expert_bias"):
            tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))


def logits(argv, randomise: bool = False):
    """(our model's evaluation-mode logits, its job) for a training command line (with --load: loaded)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    with contextlib.redirect_stdout(io.StringIO()):
        job = setup(argv)
    checkpointing.load_checkpoint(job)
    if randomise:
        randomise_vectors(job.model[0].module)
    model, vocab = job.model[0].module.eval(), job.tokenizer.vocab_size
    with torch.no_grad():
        return model(TOKENS, torch.arange(TOKENS.shape[1]).expand_as(TOKENS), None)[..., :vocab], job


def run_case(work: Path, job_flags, flags):
    ours, job = logits(job_flags + flags + ["--save", str(work / "ckpt")], randomise=True)
    checkpointing.save_checkpoint(job, 1, 0)
    try:
        export(str(work / "ckpt"), str(work / "hf"))
    except ConversionError as error:
        return {"refused": str(error)}
    name, theirs, servable = hf_logits(work / "hf")
    result = {"class": name, "diff": (theirs - ours).abs().max().item(), **servable}
    parallel_state.destroy_model_parallel()
    lines = import_hf(str(work / "hf"), str(work / "imported"))
    # the imported checkpoint is what --load --finetune reads, with the flags the import printed
    pretrain = next(line for line in lines if line.startswith("pretrain with: ")).split()[2:]
    result["load_diff"] = (logits(job_flags + pretrain)[0] - ours).abs().max().item()
    export(str(work / "imported"), str(work / "hf2"))
    name2, again, _ = hf_logits(work / "hf2")
    result.update(round_trip_class=name2, round_trip_diff=(again - theirs).abs().max().item())
    return result


if __name__ == "__main__":
    out, work, spec = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    results = {}
    for name, case in spec["cases"].items():
        results[name] = run_case(work / name, spec["job"], case["flags"])
    out.write_text(json.dumps(results, indent=1))
