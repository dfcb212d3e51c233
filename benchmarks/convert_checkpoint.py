"""Streaming Hugging Face conversion at real size: peak memory and time of import and export.

    python benchmarks/convert_checkpoint.py [--layers 8] [--hidden 2048] [--experts 8] [--moe-ffn 2304]
                                            [--vocab 32000] [--work-dir DIR]

Writes a synthetic Mixtral folder (random weights, stored in bf16 to halve the disk it takes; about
1.17 B parameters with the defaults), then runs, each as its own process (``os.wait4`` gives that process's
peak RSS): ``tools/convert_checkpoint.py import`` (-> our fp32 torch_dist checkpoint), ``export`` (-> an
fp32 Hugging Face folder) and a plain ``cp -r`` of the checkpoint. Prints the figures and the same-run
ratios the targets are stated in: peak RSS <= 25 % of the model's fp32 bytes in both directions, export
time <= 2x the copy's (also given without the process start-up, importing torch and what export uses,
measured in the same run). Everything it writes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_moe.conversion.hf_files import SafetensorsWriter, write_json  # noqa: E402


def mixtral_layout(a):
    kv, out = a.hidden // a.heads * a.kv_heads, [("model.embed_tokens.weight", (a.vocab, a.hidden))]
    for layer in range(a.layers):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (a.hidden,)), (p + "self_attn.q_proj.weight", (a.hidden, a.hidden)),
                (p + "self_attn.k_proj.weight", (kv, a.hidden)), (p + "self_attn.v_proj.weight", (kv, a.hidden)),
                (p + "self_attn.o_proj.weight", (a.hidden, a.hidden)),
                (p + "post_attention_layernorm.weight", (a.hidden,)),
                (p + "block_sparse_moe.gate.weight", (a.experts, a.hidden))]
        for e in range(a.experts):
            q = p + f"block_sparse_moe.experts.{e}."
            out += [(q + "w1.weight", (a.moe_ffn, a.hidden)), (q + "w3.weight", (a.moe_ffn, a.hidden)),
                    (q + "w2.weight", (a.hidden, a.moe_ffn))]
    return out + [("model.norm.weight", (a.hidden,)), ("lm_head.weight", (a.vocab, a.hidden))]


def write_synthetic_mixtral(folder: Path, a) -> int:
    """The folder, one tensor at a time; returns the parameter count."""
    folder.mkdir(parents=True)
    layout = [(name, shape, torch.bfloat16) for name, shape in mixtral_layout(a)]
    writer = SafetensorsWriter(folder, layout, 2 * 2**30)
    generator = torch.Generator().manual_seed(0)
    for name, shape, dtype in layout:
        tensor = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=generator) * 0.02
        writer.write(name, tensor.to(dtype))
    writer.finish()
    write_json(folder / "config.json", {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": a.vocab,
        "hidden_size": a.hidden, "intermediate_size": a.moe_ffn, "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "num_local_experts": a.experts,
        "num_experts_per_tok": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": None, "torch_dtype": "bfloat16"})
    return sum(torch.Size(shape).numel() for _, shape, _ in layout)


def measured(argv) -> tuple:
    """(wall seconds, peak RSS bytes, CPU seconds) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore"))
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed:\n{child.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss: kilobytes on Linux


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--moe-ffn", type=int, default=2304)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--work-dir", default=None, help="default: a temporary folder (removed at the end)")
    a = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=a.work_dir))
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    try:
        params = write_synthetic_mixtral(work / "hf", a)
        fp32 = 4 * params
        import_s, import_rss, import_cpu = measured(tool + ["import", "--hf", str(work / "hf"), "--save", str(work / "ckpt")])
        checkpoint = work / "ckpt" / "iter_0000000"
        export_s, export_rss, export_cpu = measured(tool + ["export", "--load", str(work / "ckpt"), "--output", str(work / "out"),
                                                "--dtype", "fp32"])
        copy_s, _, copy_cpu = measured(["cp", "-r", str(checkpoint), str(work / "copy")])
        # what export spends before its first tensor: importing torch, torch's DCP and our conversion modules
        startup_s, _, startup_cpu = measured([sys.executable, "-c", "import megatron_moe.conversion.hf_export, "
                                              "megatron_moe.tokenizer"])
        figures = {
            "parameters": params, "fp32_bytes": fp32, "checkpoint_bytes": folder_bytes(checkpoint),
            "exported_bytes": folder_bytes(work / "out"),
            "import_s": round(import_s, 1), "import_cpu_s": round(import_cpu, 1), "import_peak_rss_bytes": import_rss,
            "import_rss_over_fp32": round(import_rss / fp32, 3),
            "export_s": round(export_s, 1), "export_cpu_s": round(export_cpu, 1), "export_peak_rss_bytes": export_rss,
            "export_rss_over_fp32": round(export_rss / fp32, 3),
            "copy_s": round(copy_s, 1), "copy_cpu_s": round(copy_cpu, 1), "export_over_copy_time": round(export_s / copy_s, 2),
            "startup_s": round(startup_s, 1), "startup_cpu_s": round(startup_cpu, 1),
            # the machine may be shared: CPU seconds are the figures that other processes do not stretch
            "export_over_copy_cpu": round(export_cpu / copy_cpu, 2),
            "export_without_startup_over_copy_cpu": round((export_cpu - startup_cpu) / copy_cpu, 2),
            "export_without_startup_over_copy_time": round((export_s - startup_s) / copy_s, 2),
        }
        print(json.dumps(figures, indent=1))
        print(f"{params / 1e9:.2f} B parameters ({fp32 / 2**30:.2f} GiB fp32): import {import_s:.1f} s, peak RSS "
              f"{import_rss / 2**30:.2f} GiB ({100 * import_rss / fp32:.1f} % of fp32; target <= 25 %); export "
              f"{export_s:.1f} s, peak RSS {export_rss / 2**30:.2f} GiB ({100 * export_rss / fp32:.1f} %); copying "
              f"the checkpoint {copy_s:.1f} s: export / copy = {export_s / copy_s:.2f} (target <= 2), "
              f"{(export_s - startup_s) / copy_s:.2f} without the {startup_s:.1f} s start-up (imports); CPU seconds "
              f"{export_cpu:.1f} / {copy_cpu:.1f} = {export_cpu / copy_cpu:.2f}, "
              f"{(export_cpu - startup_cpu) / copy_cpu:.2f} without start-up")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
