"""python benchmarks/_first_contact_worker.py PLAN.json: the measuring half of ``benchmarks/gpu_first_contact.py``.

PLAN.json is a list of ``{"step": NAME, "out": RESULT.json, "flags": [pretrain flags], ...options}``. The
steps run one after the other in this process; each writes its RESULT.json when it ends, figures or error,
so a step that fails costs only its own figures. After an error that leaves the CUDA context unusable the
process exits (status 3) and the caller starts a new one for the steps left.

Steps (one process, so ``pretrain``'s plain launch: a one-process group):
- ``grads``: one forward and backward of the global batch; saves the loss and every gradient (``tensors``);
- ``pretrain``: ``pretrain``'s loop; the lm loss and wall time of every iteration;
- ``mfu``: ``train_step`` timed after ``warmup`` steps, the model FLOPs per token (formula in
  :func:`model_flops_per_token`), model TFLOP/s and MFU against ``peak_tflops``;
- ``train_and_kill``: ``pretrain``'s loop (with ``--save``) writing its losses after every iteration, then
  SIGKILL after iteration ``kill_after``, as a crashed node;
- ``resume``: ``pretrain``'s loop from ``--load``; its losses;
- ``fp8_gemm``: bf16 ``torch.mm`` and FP8 (e4m3) ``torch._scaled_mm`` TFLOP/s at ``shapes``.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _release(job) -> None:
    """Frees a job's model and process groups so that the next step can build another."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import moe_utils

    from megatron_moe.moe import comm_stats

    parallel_state.destroy_model_parallel()
    moe_utils.get_moe_layer_wise_logging_tracker().clear()
    comm_stats.reset()
    del job
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _batches(job):
    from megatron.core import parallel_state

    from megatron_moe import data

    train_ds, _, _ = data.build_datasets(job.args, job.tokenizer)
    return data.micro_batches(train_ds, job.args, 0, parallel_state.get_data_parallel_rank())


def step_grads(plan):
    from megatron_moe import training
    from megatron_moe.model import global_parameter_name

    torch.set_float32_matmul_precision("highest")  # fp32 products, no TF32 on a GPU
    job = training.setup(plan["flags"])
    job.model[0].zero_grad_buffer()
    loss = training.run_micro_batches(job, _batches(job), forward_only=False)
    model = job.model[0].module
    grads = {global_parameter_name(model, name): param.main_grad.detach().float().cpu()
             for name, param in model.named_parameters() if getattr(param, "main_grad", None) is not None}
    torch.save({"loss": loss, "grads": grads}, plan["tensors"])
    _release(job)
    return {"loss": loss, "tensors": plan["tensors"], "num_tensors": len(grads)}


def step_pretrain(plan):
    from megatron_moe import training

    job = training.setup(plan["flags"])
    ends = []

    def after_iteration(iteration, losses):  # the losses were just read: the device is done with the step
        ends.append(time.perf_counter())

    start = time.perf_counter()
    losses = training.train(job, after_iteration)
    args = job.args
    _release(job)
    seconds = [b - a for a, b in zip([start] + ends[:-1], ends)]
    skip = min(len(seconds) // 5, 5)  # compilation, allocator warm-up
    step = statistics.median(seconds[skip:])
    quarter = max(1, len(losses) // 4)
    falls = sum(losses[-quarter:]) < sum(losses[:quarter])
    return {**({} if falls else {"status": "failed", "error": "the loss did not fall"}),
            "losses": losses, "loss_falls": falls, "step_seconds": seconds, "median_step_seconds": step,
            "tokens_per_second": args.global_batch_size * args.seq_length / step,
            "tokens_per_step": args.global_batch_size * args.seq_length}


def model_flops_per_token(args) -> dict:
    """Training FLOPs per token of the model's matrix products (forward + backward = 3 x forward):

        6 * (L * (attention 2h(h + h_kv) + router h E + k experts x 3 h f (SwiGLU; 2 h f otherwise))
             + LM head h V) + 12 L h s   (attention scores and weighted sum, full s x s as computed)

    with h hidden, h_kv = kv channels x query groups (h without --group-query-attention), L layers (all MoE
    here), E experts, k experts per token, f expert FFN size, V padded vocabulary, s sequence length. Norms,
    softmax, activations and the dispatch are left out, as in the usual MFU formula (PaLM, Megatron-LM)."""
    h, layers, seq = args.hidden_size, args.num_layers, args.seq_length
    groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    kv = (args.kv_channels or h // args.num_attention_heads) * groups
    matrices = 3 if args.swiglu else 2
    experts = args.num_experts or 0
    ffn = args.moe_ffn_hidden_size or args.ffn_hidden_size
    per_layer = 2 * h * (h + kv) + h * experts + args.moe_router_topk * matrices * h * ffn
    active_parameters = layers * per_layer + h * args.padded_vocab_size
    return {"flops_per_token": 6 * active_parameters + 12 * layers * h * seq,
            "active_parameters": active_parameters}


def step_mfu(plan):
    from megatron_moe import training

    job = training.setup(plan["flags"])
    args, is_cuda = job.args, job.platform.is_cuda
    parameters = sum(p.numel() for p in job.model[0].module.parameters())
    batches = _batches(job)
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for iteration in range(1, plan["warmup"] + plan["iterations"] + 1):
        _synchronize()
        start = time.perf_counter()
        training.train_step(job, batches, iteration)
        _synchronize()
        seconds.append(time.perf_counter() - start)
    step = statistics.median(seconds[plan["warmup"]:])
    tokens = args.global_batch_size * args.seq_length
    flops = model_flops_per_token(args)
    tflops = flops["flops_per_token"] * tokens / step / 1e12
    result = {"router": args.moe_router_type, "top_k": args.moe_router_topk, "parameters": parameters,
              **flops, "tokens_per_step": tokens, "median_step_seconds": step, "step_seconds": seconds,
              "tokens_per_second": tokens / step, "model_tflops": tflops, "mfu": tflops / plan["peak_tflops"],
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if is_cuda else None}
    _release(job)
    return result


def step_train_and_kill(plan):
    from megatron_moe import training

    job = training.setup(plan["flags"])
    out = Path(plan["losses"])

    def after_iteration(iteration, losses):
        out.write_text(json.dumps(losses))
        if iteration == plan["kill_after"]:
            os.kill(os.getpid(), signal.SIGKILL)

    training.train(job, after_iteration)
    raise RuntimeError(f"the run ended before iteration {plan['kill_after']}")


def step_resume(plan):
    from megatron_moe import training

    job = training.setup(plan["flags"])
    losses = training.train(job)
    _release(job)
    return {"losses": losses}


def _gemm_seconds(run, repeats: int) -> float:
    run()
    _synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    _synchronize()
    return (time.perf_counter() - start) / repeats


def step_fp8_gemm(plan):
    """[M, K] x [K, N] in bf16 and in e4m3 with per-tensor scales (amax / 448, the largest e4m3 value),
    bf16 output, as Transformer Engine's per-tensor recipes feed cuBLAS."""
    device = torch.device(plan["device"])
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no float8_e4m3fn / _scaled_mm")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError(f"FP8 GEMMs need compute capability 8.9 or newer, this GPU has "
                           f"{torch.cuda.get_device_capability(device)}")
    e4m3_max = torch.finfo(torch.float8_e4m3fn).max
    generator = torch.Generator(device=device).manual_seed(0)
    results = []
    for name, m, k, n in plan["shapes"]:
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=generator)
        b = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=generator)  # row-major [N, K]
        scale_a = (a.abs().max().float() / e4m3_max).reshape(())
        scale_b = (b.abs().max().float() / e4m3_max).reshape(())
        a8 = (a.float() / scale_a).to(torch.float8_e4m3fn)
        b8 = (b.float() / scale_b).to(torch.float8_e4m3fn).t()  # column-major [K, N], as cuBLAS wants it
        reference = a @ b.t()
        record = {"shape": name, "m": m, "k": k, "n": n}
        record["bf16_tflops"] = 2 * m * k * n / _gemm_seconds(lambda: a @ b.t(), plan["repeats"]) / 1e12
        for fast in (False, True):
            def fp8():
                return torch._scaled_mm(a8, b8, scale_a, scale_b, out_dtype=torch.bfloat16, use_fast_accum=fast)
            key = "fp8_fast_accum" if fast else "fp8"
            record[f"{key}_tflops"] = 2 * m * k * n / _gemm_seconds(fp8, plan["repeats"]) / 1e12
            error = (fp8().float() - reference.float()).norm() / reference.float().norm()
            record[f"{key}_relative_error"] = error.item()
        results.append(record)
    return {"device": str(device), "gemms": results}


STEPS = {"grads": step_grads, "pretrain": step_pretrain, "mfu": step_mfu, "train_and_kill": step_train_and_kill,
         "resume": step_resume, "fp8_gemm": step_fp8_gemm}


def _context_lost(error: BaseException) -> bool:
    text = str(error)
    return "CUDA error" in text or "illegal memory access" in text or "CUBLAS_STATUS" in text


def main(plan_path: str) -> int:
    for plan in json.loads(Path(plan_path).read_text()):
        start = time.perf_counter()
        try:
            record = {"status": "ok", **STEPS[plan["step"]](plan)}
        except Exception as error:  # recorded; the other steps go on
            record = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()[-4000:]}
            if _context_lost(error):
                record["seconds"] = time.perf_counter() - start
                Path(plan["out"]).write_text(json.dumps(record))
                return 3
        record["seconds"] = time.perf_counter() - start
        Path(plan["out"]).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
