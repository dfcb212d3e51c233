"""Converts checkpoints between megatron-moe and Hugging Face transformers.

    python tools/convert_checkpoint.py export --load CKPT_DIR --output HF_DIR [--dtype bf16|fp16|fp32]
                                              [--overwrite] [-- TRAINING FLAGS]
    python tools/convert_checkpoint.py import --hf HF_DIR --save CKPT_DIR [--overwrite] [-- TRAINING FLAGS]

``export`` reads a checkpoint saved with any TP/PP/EP layout (its latest iteration) tensor by tensor; the
run config it records decides the Hugging Face class, or refuses (naming the flag) before any weight is
read. Flags after ``--`` are training flags that override the recorded ones (e.g. another tokenizer's
files). Each routing option goes to the first transformers class that computes the same model (Mixtral,
Qwen2-MoE, Qwen3-MoE, GLM-4.5's Glm4Moe: softmax, sigmoid, group-limited top-k with expert bias and scaling,
BASE), else to our modeling code in the folder (``trust_remote_code=True``: SAM, and the options no class
computes); docs/conversion.md has the table. ``import`` reads the folders of those classes back and writes
iteration 0 (model weights only) of a checkpoint that ``pretrain_gpt_moe.py --load CKPT_DIR --finetune``
starts from in any layout (flags after ``--`` are added to its run config). Both stream: memory stays about
one tensor. Needs ``pip install .[hf]``.
"""

import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="our checkpoint -> Hugging Face folder")
    export.add_argument("--load", required=True, help="a --save directory of pretrain_gpt_moe.py")
    export.add_argument("--output", required=True, help="the Hugging Face folder to write")
    export.add_argument("--max-shard-size-mb", type=int, default=5120, help="safetensors shard size")
    export.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="the exported tensors' dtype (default: the training dtype, bf16 for a --bf16 run)")
    importer = sub.add_parser("import", help="Hugging Face folder -> our checkpoint")
    export.add_argument("--no-verify-checkpoint", dest="verify_checkpoint", action="store_false",
                        help="export without checking the checkpoint's file digests (manifest.json)")
    importer.add_argument("--hf", required=True, help="a Hugging Face Mixtral, Qwen2-MoE, Qwen3-MoE or Glm4Moe "
                                                      "folder (or one of our remote-code exports)")
    importer.add_argument("--save", required=True, help="the checkpoint directory to write")
    for command in (export, importer):
        command.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


# the optional [hf] extra: checked before anything runs, so that an ImportError inside them is a bug report
HF_PACKAGES = ("transformers", "safetensors", "tokenizers")


def missing_hf_packages():
    return [name for name in HF_PACKAGES if importlib.util.find_spec(name) is None]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    missing = missing_hf_packages()
    if missing:
        print(f"convert_checkpoint.py: error: {', '.join(missing)} not installed: pip install '.[hf]'", file=sys.stderr)
        return 2
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # conversion runs on the CPU, one process
    from megatron_moe.arguments import ConfigError
    from megatron_moe.conversion.hf_layout import ConversionError

    try:
        if args.command == "export":
            from megatron_moe.conversion.hf_export import export

            lines = export(args.load, args.output, args.overwrite, overrides, args.max_shard_size_mb * 2**20,
                           args.dtype, args.verify_checkpoint)
        else:
            from megatron_moe.conversion.hf_import import import_hf

            lines = import_hf(args.hf, args.save, args.overwrite, overrides)
    except (ConversionError, ConfigError) as error:
        print(f"convert_checkpoint.py: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
