#!/usr/bin/env python3
"""Everything a short-lent GPU should measure, in one command of at most 8 minutes.

    python benchmarks/gpu_first_contact.py --out DIR            # on one H100 / H200
    python benchmarks/gpu_first_contact.py --out DIR --dry-run  # tiny sizes on the CPU (CI runs it)

Needs torch with CUDA, megatron-core 0.16.1 and numpy, packaging, psutil; no Transformer Engine (the
local spec carries every figure). docs/gpu_first_contact.md says which wheels to bring and what each
figure means. Each step is timed and fails on its own: DIR/figures.json and DIR/summary.md are rewritten
after every step, so a failure or a timeout keeps the figures already measured; DIR/logs/ holds every
subprocess's output.

Steps:
1. ``cuda_vs_cpu``: one forward and backward of the same tiny MoE model (fp32, TF32 off) on the CPU and on
   the GPU: the loss and every gradient agree within ``RTOL`` of the tensor's largest value;
2. ``pretrain``: 50 iterations of a small MoE on the GPU, local spec, bf16: the loss falls; step time and
   tokens/s;
3. ``mfu_topk``, ``mfu_sam``, ``mfu_base``: a ~1B-parameter MoE (12 layers, hidden 1024, 8 experts of FFN
   3072, top-2; BASE is top-1 by design) on one GPU, local spec, bf16: model TFLOP/s and MFU against the
   H100's 989 dense bf16 TFLOP/s (formula: ``_first_contact_worker.model_flops_per_token``);
4. ``base_solver``: ``benchmarks/balanced_assignment.py --device cuda``, its output recorded as it is
   ("not available" while that script has no ``--device``);
5. ``fp8_gemm``: bf16 and FP8 (e4m3, per-tensor scales) GEMM TFLOP/s at the MoE's expert shapes through
   ``torch._scaled_mm``, a same-machine reference for Transformer Engine's figures;
6. ``save_kill_resume``: a run saves at iteration 3 and is SIGKILLed after iteration 5; a second run resumes
   from the checkpoint: iterations 4 and 5 give the same losses, bit for bit (dry run: saved at 2, killed after 3).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_first_contact_worker.py"
SOLVER_BENCHMARK = Path(__file__).resolve().parent / "balanced_assignment.py"

H100_DENSE_BF16_TFLOPS = 989.0
RTOL = 1e-4  # CUDA vs CPU: |cuda - cpu| <= RTOL * max |cpu|, per tensor (fp32, TF32 off)
STEPS = ("cuda_vs_cpu", "pretrain", "mfu_topk", "mfu_sam", "mfu_base", "base_solver", "fp8_gemm",
         "save_kill_resume")
WHEELS = ("pip install --no-index --no-deps wheels/*.whl  (megatron_core-0.16.1-cp312-*.whl, numpy, packaging, "
          "psutil: see docs/gpu_first_contact.md)")

COMMON = ["--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear", "--mock-data", "--tokenizer-type",
          "NullTokenizer", "--hidden-dropout", "0", "--attention-dropout", "0", "--transformer-impl", "local",
          "--seed", "1234", "--eval-iters", "0", "--lr-warmup-iters", "0"]
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--num-experts", "4", "--moe-router-topk", "2",
        "--moe-ffn-hidden-size", "128", "--moe-aux-loss-coeff", "0.01", "--vocab-size", "1000",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--log-interval", "1"]
SMALL = ["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8", "--seq-length", "512",
         "--max-position-embeddings", "512", "--num-experts", "8", "--moe-router-topk", "2",
         "--moe-ffn-hidden-size", "1024", "--moe-aux-loss-coeff", "0.01", "--vocab-size", "32000",
         "--micro-batch-size", "4", "--global-batch-size", "32", "--lr", "3e-4", "--log-interval", "10", "--bf16"]
ONE_B = ["--num-layers", "12", "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "2048",
         "--max-position-embeddings", "2048", "--num-experts", "8", "--moe-ffn-hidden-size", "3072",
         "--vocab-size", "32000", "--micro-batch-size", "2", "--global-batch-size", "16", "--lr", "1e-4",
         "--log-interval", "1000", "--bf16"]
ROUTERS = {
    "topk": ["--moe-router-type", "topk", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01"],
    "sam": ["--moe-router-type", "sam", "--moe-router-topk", "2", "--sam-num-groups", "2"],
    "base": ["--moe-router-type", "base", "--moe-router-topk", "1", "--moe-aux-loss-coeff", "0"],
}
FP8_SHAPES = [  # (name, M, K, N): rows per expert x input x output
    ("1B MoE fc1 (1024 rows/expert)", 1024, 1024, 6144),
    ("1B MoE fc2", 1024, 3072, 1024),
    ("Mixtral-8x7B fc1 (4096 rows/expert)", 4096, 4096, 28672),
    ("Mixtral-8x7B fc2", 4096, 14336, 4096),
]
TINY_FP8_SHAPES = [("tiny", 32, 64, 48)]


class Run:
    """The figures so far, written after every step."""

    def __init__(self, out: Path, dry_run: bool, budget: float):
        self.out, self.dry_run, self.deadline = out, dry_run, time.monotonic() + budget
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.figures: Dict[str, dict] = {"environment": environment(dry_run)}
        self.write()

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, step: str, result: dict) -> None:
        self.figures[step] = result
        self.write()
        status = result.get("status")
        print(f"[{step}] {status} in {result.get('seconds', 0):.1f} s"
              + (f": {result.get('error')}" if status != "ok" else ""), flush=True)

    def write(self) -> None:
        (self.out / "figures.json").write_text(json.dumps(self.figures, indent=1))
        (self.out / "summary.md").write_text(summary(self.figures))

    def env(self) -> dict:
        path = os.environ.get("PYTHONPATH")
        return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{path}" if path else str(REPO),
                    PYTHONWARNINGS="ignore", **({"CUDA_VISIBLE_DEVICES": ""} if self.dry_run else {}))

    def subprocess(self, name: str, command: List[str], timeout: float) -> subprocess.CompletedProcess:
        """Runs ``command``, its output in logs/NAME.log; a timeout is a CompletedProcess with status 124."""
        log = self.logs / f"{name}.log"
        timeout = max(1.0, min(timeout, self.seconds_left()))
        with open(log, "w") as stream:
            try:
                return subprocess.run(command, cwd=REPO, env=self.env(), stdout=stream, stderr=subprocess.STDOUT,
                                      text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return subprocess.CompletedProcess(command, 124)

    def start_worker(self, name: str, plans: List[dict], cpu_only: bool = False) -> subprocess.Popen:
        plan_file = self.out / "plans" / f"{name}.json"
        plan_file.parent.mkdir(exist_ok=True)
        plan_file.write_text(json.dumps(plans))
        env = self.env()
        if cpu_only:
            env["CUDA_VISIBLE_DEVICES"] = ""
        with open(self.logs / f"{name}.log", "a") as stream:
            return subprocess.Popen([sys.executable, str(WORKER), str(plan_file)], cwd=REPO, env=env,
                                    stdout=stream, stderr=subprocess.STDOUT, text=True)

    def work(self, name: str, plans: List[dict], timeout: float, on_result=None) -> Dict[str, dict]:
        """Runs the plans in worker processes, a new one after a crash, until each has a result; hands each
        result to ``on_result(step name, result)`` as soon as it is written."""
        results: Dict[str, dict] = {}
        deadline = time.monotonic() + min(timeout, self.seconds_left())

        def collect(plans_left):
            for plan in plans_left:
                if plan["step_name"] not in results and Path(plan["out"]).exists():
                    results[plan["step_name"]] = json.loads(Path(plan["out"]).read_text())
                    if on_result is not None:
                        on_result(plan["step_name"], results[plan["step_name"]])

        attempt = 0
        while len(results) < len(plans):
            left = [plan for plan in plans if plan["step_name"] not in results]
            process = self.start_worker(f"{name}.{attempt}", left)
            status = wait(process, deadline, poll=lambda: collect(left))
            collect(left)
            unfinished = [plan for plan in left if plan["step_name"] not in results]
            for index, plan in enumerate(unfinished):
                # the first was running when the process died or ran out of time; the others wait for a new
                # process, unless the time is out
                if index == 0 or status is None:
                    why = ("timed out" if status is None else f"the worker process died (status {status})")
                    results[plan["step_name"]] = {"status": "failed", "error": (
                        f"{why}; see logs/{name}.{attempt}.log" if index == 0 else "not started: out of time")}
                    if on_result is not None:
                        on_result(plan["step_name"], results[plan["step_name"]])
            attempt += 1
        return results


def wait(process: subprocess.Popen, deadline: float, poll=None) -> Optional[int]:
    """The process's exit status, or None after killing it at ``deadline``; ``poll()`` every 2 s meanwhile."""
    while True:
        try:
            return process.wait(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                process.kill()
                process.wait()
                return None
            if poll is not None:
                poll()


def environment(dry_run: bool) -> dict:
    import torch

    info = {"status": "ok", "dry_run": dry_run, "python": sys.version.split()[0], "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    for module, distribution in (("megatron.core", "megatron-core"), ("transformer_engine", "transformer-engine"),
                                 ("numpy", "numpy"), ("psutil", "psutil")):
        present = importlib.util.find_spec(module.split(".")[0]) is not None and (
            "." not in module or importlib.util.find_spec(module) is not None)
        try:
            info[module] = importlib.metadata.version(distribution) if present else None
        except importlib.metadata.PackageNotFoundError:
            info[module] = "present"
    return info


# --------------------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------------------


def plan(run: Run, step_name: str, step: str, **options) -> dict:
    return {"step_name": step_name, "step": step, "out": str(run.out / "results" / f"{step_name}.json"), **options}


def device_flags(run: Run) -> List[str]:
    return ["--device", "cpu" if run.dry_run else "cuda"]


def compare_gradients(cpu: dict, device: dict) -> dict:
    import torch

    worst, worst_name = 0.0, None
    for name, reference in cpu["grads"].items():
        scale = reference.abs().max().item() or 1.0
        error = (device["grads"][name] - reference).abs().max().item() / scale
        if error > worst:
            worst, worst_name = error, name
    loss_error = abs(device["loss"] - cpu["loss"]) / abs(cpu["loss"])
    return {"status": "ok" if worst <= RTOL and loss_error <= RTOL and cpu["grads"].keys() == device["grads"].keys()
            else "failed", "rtol": RTOL, "loss_cpu": cpu["loss"], "loss_device": device["loss"],
            "loss_relative_error": loss_error, "worst_gradient_relative_error": worst, "worst_gradient": worst_name,
            "gradients_compared": len(cpu["grads"]), "torch": torch.__version__}


def run_device_steps(run: Run, steps: List[str]) -> None:
    """The in-process steps: CPU reference (beside the device work), grads, pretrain, MFU, FP8 GEMMs."""
    results_dir = run.out / "results"
    results_dir.mkdir(exist_ok=True)
    tensors = {where: str(results_dir / f"grads_{where}.pt") for where in ("cpu", "device")}
    reference = None
    if "cuda_vs_cpu" in steps:
        reference = run.start_worker("cuda_vs_cpu_reference", [plan(
            run, "grads_cpu", "grads", flags=COMMON + TINY + ["--train-iters", "1", "--device", "cpu"],
            tensors=tensors["cpu"])], cpu_only=True)
    plans = []
    if "cuda_vs_cpu" in steps:
        plans.append(plan(run, "grads_device", "grads", flags=COMMON + TINY + ["--train-iters", "1"] + device_flags(run),
                          tensors=tensors["device"]))
    if "pretrain" in steps:
        model = TINY if run.dry_run else SMALL
        plans.append(plan(run, "pretrain", "pretrain",
                          flags=COMMON + model + ["--train-iters", "4" if run.dry_run else "50"] + device_flags(run)))
    for router, flags in ROUTERS.items():
        if f"mfu_{router}" in steps:
            model = TINY if run.dry_run else ONE_B
            plans.append(plan(run, f"mfu_{router}", "mfu", flags=COMMON + model + flags + ["--train-iters", "100"]
                              + device_flags(run), warmup=0 if run.dry_run else 3,
                              iterations=1 if run.dry_run else 10, peak_tflops=H100_DENSE_BF16_TFLOPS))
    if "fp8_gemm" in steps:
        plans.append(plan(run, "fp8_gemm", "fp8_gemm", device="cpu" if run.dry_run else "cuda",
                          shapes=TINY_FP8_SHAPES if run.dry_run else FP8_SHAPES, repeats=2 if run.dry_run else 20))
    def record(name, result):
        if name != "grads_device":  # compared with the CPU reference below
            run.record(name, result)

    results = run.work("device", plans, timeout=run.seconds_left() - 120, on_result=record) if plans else {}
    if reference is not None:
        status = wait(reference, time.monotonic() + 120)
        cpu = json.loads(Path(results_dir / "grads_cpu.json").read_text()) if status == 0 else None
        device = results.get("grads_device", {})
        if cpu is None or cpu.get("status") != "ok" or device.get("status") != "ok":
            run.record("cuda_vs_cpu", {"status": "failed", "seconds": device.get("seconds", 0),
                                       "error": (cpu or {}).get("error") or device.get("error")
                                       or f"the CPU reference exited with status {status}"})
        else:
            import torch

            compared = compare_gradients(torch.load(tensors["cpu"]), torch.load(tensors["device"]))
            run.record("cuda_vs_cpu", {**compared, "seconds": device["seconds"], "cpu_seconds": cpu["seconds"]})


def run_base_solver(run: Run) -> None:
    start = time.perf_counter()
    # the device mode times the solve eager and graph-captured beside our MoE layer (docs/balanced_assignment.md)
    arguments = ["--device", "cpu", "--tiny"] if run.dry_run else ["--device", "cuda", "--repeats", "10"]
    result = run.subprocess("base_solver", [sys.executable, str(SOLVER_BENCHMARK), *arguments],
                            timeout=60 if run.dry_run else min(180, max(30, run.seconds_left() - 60)))
    output = (run.logs / "base_solver.log").read_text()
    run.record("base_solver", {"status": "ok" if result.returncode == 0 else "failed",
                               "seconds": time.perf_counter() - start, "arguments": arguments,
                               "returncode": result.returncode, "output": output[-6000:],
                               **({} if result.returncode == 0 else {"error": f"exit status {result.returncode}"})})


class SaveKillResume:
    """A run saves at iteration ``save_at`` and is SIGKILLed after ``kill_after``; a second run resumes from
    the checkpoint: iterations save_at + 1 .. kill_after must give the same losses, bit for bit."""

    def __init__(self, run: Run):
        self.run, self.start = run, time.perf_counter()
        # --save-interval save_at: the kill comes before the next save
        self.save_at, self.kill_after, train_iters = (2, 3, 4) if run.dry_run else (3, 5, 7)
        self.checkpoint = run.out / "checkpoint"
        shutil.rmtree(self.checkpoint, ignore_errors=True)
        self.flags = COMMON + (TINY if run.dry_run else SMALL) + ["--train-iters", str(train_iters)] + device_flags(run)
        self.killed_losses = run.out / "results" / "killed_losses.json"
        self.killed_losses.parent.mkdir(exist_ok=True)
        self.process = run.start_worker("save_kill", [plan(
            run, "killed", "train_and_kill", losses=str(self.killed_losses), kill_after=self.kill_after,
            flags=self.flags + ["--save", str(self.checkpoint), "--save-interval", str(self.save_at)])])

    def finish(self) -> None:
        run = self.run
        status = wait(self.process, time.monotonic() + min(150, run.seconds_left()))
        if not self.killed_losses.exists() or not (self.checkpoint / "latest_checkpointed_iteration.txt").exists():
            run.record("save_kill_resume", {"status": "failed", "seconds": time.perf_counter() - self.start,
                                            "error": f"the first run (status {status}) wrote no checkpoint or "
                                                     "losses; see logs/save_kill.log"})
            return
        before = json.loads(self.killed_losses.read_text())
        resumed = run.work("resume", [plan(run, "resumed", "resume", flags=self.flags + ["--load", str(self.checkpoint)])],
                           timeout=150)["resumed"]
        shutil.rmtree(self.checkpoint, ignore_errors=True)
        if resumed.get("status") != "ok":
            run.record("save_kill_resume", {**resumed, "seconds": time.perf_counter() - self.start})
            return
        after = resumed["losses"][: self.kill_after - self.save_at]
        same = len(before) == self.kill_after and after == before[self.save_at:]
        run.record("save_kill_resume", {
            "status": "ok" if same else "failed", "seconds": time.perf_counter() - self.start,
            "saved_at": self.save_at, "killed_after": self.kill_after, "killed_run_status": status,
            "losses_before_kill": before, "losses_after_resume": resumed["losses"], "same_next_losses": same,
            **({} if same else {"error": f"iterations {self.save_at + 1}-{self.kill_after} differ after the resume"})})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for figures.json, summary.md, logs/")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (gloo): checks the script")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--budget-seconds", type=float, default=450.0,
                        help="stop starting work after this long (default 7.5 min, under the lent GPU's 8)")
    args = parser.parse_args(argv)
    run = Run(args.out, args.dry_run, args.budget_seconds)
    env = run.figures["environment"]
    if not args.dry_run and not env["cuda_available"]:
        print("gpu_first_contact.py: error: torch sees no GPU; use --dry-run to check the script on a CPU",
              file=sys.stderr)
        return 2
    if env["megatron.core"] is None:
        print(f"gpu_first_contact.py: error: megatron-core is not installed: {WHEELS}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    resume = None
    if "save_kill_resume" in args.steps and args.dry_run:  # beside the rest: no GPU timing to disturb
        resume = SaveKillResume(run)
    run_device_steps(run, args.steps)
    if "base_solver" in args.steps:
        run_base_solver(run)
    if "save_kill_resume" in args.steps:
        (resume or SaveKillResume(run)).finish()
    run.figures["environment"]["total_seconds"] = time.perf_counter() - started
    run.write()
    failed = [step for step in args.steps if run.figures.get(step, {}).get("status") == "failed"]
    print(f"{args.out / 'summary.md'}: {len(args.steps) - len(failed)} of {len(args.steps)} steps without failure"
          + (f"; failed: {' '.join(failed)}" if failed else ""))
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------------


def _number(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def summary(figures: dict) -> str:
    env = figures["environment"]
    lines = ["# GPU first contact", "",
             f"{env.get('device', 'CPU (dry run)' if env.get('dry_run') else 'no GPU')}, torch {env['torch']} "
             f"(CUDA {env['torch_cuda']}), Python {env['python']}, megatron-core {env.get('megatron.core')}, "
             f"Transformer Engine {env.get('transformer_engine') or 'absent'}"
             + (f"; {env['total_seconds']:.0f} s in all" if "total_seconds" in env else ""), ""]
    lines += ["| step | status | seconds | figures |", "|---|---|---|---|"]
    for step in STEPS:
        if step not in figures:
            continue
        record = figures[step]
        lines.append(f"| {step} | {record.get('status')} | {_number(record.get('seconds'))} | "
                     f"{_step_figures(step, record)} |")
    gemms = figures.get("fp8_gemm", {}).get("gemms")
    if gemms:
        lines += ["", "FP8 GEMMs (`torch._scaled_mm`, e4m3, per-tensor scales, bf16 output):", "",
                  "| shape | M x K x N | bf16 TFLOP/s | fp8 TFLOP/s | fp8 fast-accum TFLOP/s | fp8 rel. error |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {g['shape']} | {g['m']} x {g['k']} x {g['n']} | {g['bf16_tflops']:.1f} | {g['fp8_tflops']:.1f} | "
                  f"{g['fp8_fast_accum_tflops']:.1f} | {g['fp8_relative_error']:.2g} |" for g in gemms]
    return "\n".join(lines) + "\n"


def _step_figures(step: str, record: dict) -> str:
    if record.get("status") != "ok":
        return str(record.get("error", "")).replace("|", "/").splitlines()[0][:200] if record.get("error") else ""
    if step == "cuda_vs_cpu":
        return (f"loss {record['loss_device']:.6f} vs {record['loss_cpu']:.6f}; worst gradient error "
                f"{record['worst_gradient_relative_error']:.2g} of its max (tolerance {record['rtol']:g})")
    if step == "pretrain":
        losses = record["losses"]
        return (f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} iterations; step "
                f"{record['median_step_seconds'] * 1000:.1f} ms, {record['tokens_per_second']:.0f} tokens/s")
    if step.startswith("mfu_"):
        return (f"{record['parameters'] / 1e9:.2f} B parameters, top-{record['top_k']}: step "
                f"{record['median_step_seconds'] * 1000:.0f} ms, {record['tokens_per_second']:.0f} tokens/s, "
                f"{record['model_tflops']:.1f} model TFLOP/s, MFU {100 * record['mfu']:.1f}%"
                + (f", peak {record['peak_memory_gib']:.1f} GiB" if record.get("peak_memory_gib") else ""))
    if step == "base_solver":
        return f"see figures.json (output of balanced_assignment.py {' '.join(record['arguments'])})"
    if step == "fp8_gemm":
        return f"{len(record['gemms'])} shapes, below"
    if step == "save_kill_resume":
        first, last = record["saved_at"] + 1, record["killed_after"]
        return (f"iterations {first}-{last}: {record['losses_after_resume'][: last - first + 1]} after the resume, "
                f"{record['losses_before_kill'][first - 1:]} before the kill")
    return ""


if __name__ == "__main__":
    sys.exit(main())
