"""README stays true: its commands run, its tables match the scripts and the stored results, its flag counts
the parser and Megatron-LM's table, and its links (and those of docs/) resolve.

Every fenced code block of README.md follows a marker comment saying what this test does with it:

- ``<!-- readme-test: run [VAR=VALUE ...] -->``: run as a bash script, in README order, in one sandbox (the
  repository's entry points and ``data/`` files linked in, a ``corpus.jsonl`` of KJV verses for the "your
  data" commands), with those variables added: the short form README names (``ITERS=2``);
- ``<!-- readme-test: parse -->``: GPU or cluster launches. A ``torchrun ... pretrain_gpt_moe.py`` line's flags
  are parsed for its world size; a line running an example script (``sbatch``, ``bash examples/...``) runs
  with stand-ins for sbatch, srun, scontrol and torchrun, and the pretrain flags the script hands torchrun are
  parsed, and must carry the line's ``DATA_PATH``, ``CHECKPOINTS`` and ``ROUTER``;
- ``<!-- readme-test: skip: REASON -->``: not a command that runs here (installs, log output).

``make demo`` is run as its Makefile recipe, shortened to 2 iterations (``make`` itself would install).
About 2 minutes on the 2-core machine under load.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from launcher import REPO

from megatron_moe.arguments import parse_args

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MARKER = re.compile(r"<!-- readme-test: (.*?) -->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
ENV_ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(\S*)$")
QUALITY_TABLE = REPO / "benchmarks" / "results" / "routing_quality" / "table.md"


def code_blocks(text: str) -> List[Tuple[str, str]]:
    """(marker, body) of every fenced block; the marker is the comment on the line before it ('' if none)."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        blocks.append((marker.group(1) if marker else "", match.group(2)))
    return blocks


def commands(body: str) -> List[str]:
    """The block's command lines (continuations joined, comments dropped)."""
    lines = body.replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def env_prefix(line: str) -> Tuple[Dict[str, str], List[str]]:
    """The leading VAR=VALUE assignments of a command line, and the rest of its words."""
    words, env = shlex.split(line), {}
    while words and ENV_ASSIGNMENT.match(words[0]):
        name, value = ENV_ASSIGNMENT.match(words[0]).groups()
        env[name] = value
        words = words[1:]
    return env, words


BLOCKS = code_blocks(README.read_text())


def test_every_code_block_says_how_it_is_tested():
    unmarked = [body.splitlines()[0] if body else "" for marker, body in BLOCKS
                if not re.fullmatch(r"run( [A-Z_]+=\S+)*|parse|skip: .+", marker)]
    assert not unmarked, f"README code blocks without a readme-test marker: {unmarked}"
    assert any(marker.startswith("run") for marker, _ in BLOCKS)


# ------------------------------------------------------------------------------------------------ run


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working directory where README's relative paths resolve: the entry points linked in, ``data/`` a
    folder of links to the repository's demo data (so that outputs stay here), ``corpus.jsonl`` your data."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("pretrain_gpt_moe.py", "tools", "examples", "benchmarks", "Makefile"):
        (root / name).symlink_to(REPO / name)
    data = root / "data"
    data.mkdir()
    demo = [path for path in (REPO / "data").iterdir() if path.is_file()]
    assert any(path.name == "kjv_text_document.bin" for path in demo), "README's commands need `make data` first"
    for path in demo:
        (data / path.name).symlink_to(path)
    import importlib.util

    kjv = Path(importlib.util.find_spec("bible").submodule_search_locations[0]) / "data" / "kjv.jsonl"
    with open(kjv) as source, open(root / "corpus.jsonl", "w") as corpus:
        for _, line in zip(range(3000), source):
            corpus.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    return root


def run_env(extra: Dict[str, str]) -> Dict[str, str]:
    """python and torchrun of this interpreter's environment, this checkout's code, CPU only."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PATH=path, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                CUDA_VISIBLE_DEVICES="", **extra)


def run_bash(script: str, cwd: Path, env: Dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{script}\nexited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_readme_commands_run_in_their_short_form(sandbox):
    runs = [(marker, body) for marker, body in BLOCKS if marker.startswith("run")]
    outputs = []
    for marker, body in runs:
        extra = dict(assignment.split("=", 1) for assignment in marker.split()[1:])
        outputs.append(run_bash(body, sandbox, run_env(extra)).stdout)
    text = "\n".join(outputs)
    # the CPU example, then training on your data: each validates after its last iteration
    assert text.count(" validation loss at iteration 2 on validation set |") == 2, text[-3000:]
    assert "MixtralForCausalLM" in text  # what the exported folder loads as
    assert (sandbox / "imported_ckpt" / "latest_checkpointed_iteration.txt").is_file()


def makefile_recipe(target: str) -> str:
    """The commands of a Makefile target (continuations joined), with $(VAR) of the Makefile's own names
    replaced by what PATH gives here."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    return recipe.replace("$(TORCHRUN)", "torchrun").replace("$(PY)", "python")


def test_make_demo_recipe_runs(sandbox):
    assert any("make demo" in body for _, body in BLOCKS)
    short = " --train-iters 2 --lr-warmup-iters 0 --log-interval 1"  # later flags win
    result = run_bash(makefile_recipe("demo").strip() + short, sandbox, run_env({}))
    assert " iteration        2/       2 |" in result.stdout and "validation loss at iteration 2" in result.stdout


# ------------------------------------------------------------------------------------------------ parse

FAKES = {
    "torchrun": 'printf "%s\\n" "$@" > "$TORCHRUN_ARGS"',
    # sbatch [--nodes N] ... SCRIPT: the script on its first node, with SLURM's variables
    "sbatch": 'nodes=2; while [ "${1#-}" != "$1" ]; do [ "$1" = --nodes ] && { nodes=$2; shift; }; shift; done\n'
              'SLURM_JOB_NUM_NODES=$nodes SLURM_JOB_ID=4242 SLURM_JOB_NODELIST="node[0-$((nodes - 1))]" exec bash "$@"',
    "srun": 'while [ "${1#-}" != "$1" ]; do shift; done\nSLURM_NODEID=0 exec "$@"',
    "scontrol": 'echo node0; echo node1',
}


def fake_bin(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, body in FAKES.items():
        (folder / name).write_text(f"#!/bin/bash\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


def launch_options(words: List[str]) -> Tuple[Dict[str, str], List[str]]:
    """(torchrun's options, pretrain_gpt_moe.py's flags) of a torchrun command's words."""
    entry = next(i for i, word in enumerate(words) if word.endswith("pretrain_gpt_moe.py"))
    options, i = {}, 1
    while i < entry:
        if words[i] == "--standalone":
            i += 1
            continue
        options[words[i]] = words[i + 1]
        i += 2
    return options, words[entry + 1:]


def world_size(options: Dict[str, str]) -> int:
    return int(options.get("--nnodes", "1")) * int(options["--nproc_per_node"])


PARSED = [line for marker, body in BLOCKS if marker == "parse" for line in commands(body)]


@pytest.mark.parametrize("line", PARSED, ids=[line.split(" pretrain")[0][:60] for line in PARSED])
def test_gpu_and_cluster_launch_lines_parse(line, tmp_path):
    env, words = env_prefix(line)
    if words[0] == "torchrun":
        options, flags = launch_options(words)
        parse_args(flags, world_size=world_size(options))
        return
    record = tmp_path / "torchrun_args.txt"
    fakes = fake_bin(tmp_path)
    subprocess.run(words, cwd=REPO, check=True, capture_output=True, timeout=60,
                   env=dict(os.environ, **env, PATH=f"{fakes}{os.pathsep}{os.environ['PATH']}",
                            TORCHRUN_ARGS=str(record)))
    options, flags = launch_options(["torchrun", *record.read_text().splitlines()])
    args = parse_args(flags, world_size=world_size(options))
    if "NNODES" in env:
        assert options["--nnodes"] == env["NNODES"]
    if "--nodes" in words:
        assert options["--nnodes"] == words[words.index("--nodes") + 1]
    assert list(args.data_path) == [env["DATA_PATH"]] and args.moe_router_type == env.get("ROUTER", "topk")
    if "CHECKPOINTS" in env:
        assert args.save == args.load == env["CHECKPOINTS"]


# ------------------------------------------------------------------------------------------------ tables


def markdown_table_after(text: str, marker: str) -> List[List[str]]:
    """The rows (cells stripped of backticks) of the table that follows ``marker``, header and rule left out."""
    lines = text.split(marker, 1)[1].strip().splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
    return rows[2:]


def script_defaults(script: Path) -> Dict[str, str]:
    """Every ``${NAME:-DEFAULT}`` of a script (named variables only), DEFAULT with its own ${...} kept."""
    text, defaults = script.read_text(), {}
    for match in re.finditer(r"\$\{([A-Z_][A-Z0-9_]*):-", text):
        depth, i = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        defaults[match.group(1)] = text[match.end():i - 1]
    return defaults


def test_example_variables_and_defaults_are_those_of_the_scripts():
    rows = markdown_table_after(README.read_text(), "<!-- readme-test: env-table -->")
    listed: Dict[str, Dict[str, str]] = {}
    script = None
    for cells in rows:
        script = cells[0] or script
        listed.setdefault(script, {})[cells[1]] = "" if cells[2] == "(empty)" else cells[2]
    scripts = {path.name for path in (REPO / "examples").iterdir() if path.suffix in (".sh", ".sbatch")}
    assert set(listed) == scripts
    for name, variables in listed.items():
        assert variables == script_defaults(REPO / "examples" / name), name


def test_routing_quality_figures_are_the_stored_results():
    stored = QUALITY_TABLE.read_text()
    doc = (REPO / "docs" / "routing_quality.md").read_text()
    marker = "<!-- routing-quality-table: benchmarks/results/routing_quality/table.md -->"
    assert markdown_table_after(doc, marker) == markdown_table_after("\n" + stored.split("\n\n")[0], "\n")
    rows = {cells[0]: cells for cells in markdown_table_after("\n" + stored, "\n")}
    readme = README.read_text()
    for router in ("gshard", "group_limited", "base", "sam"):  # README's router table quotes these rows
        loss, rows_per_token, remote_bytes = rows[router][3], rows[router][8], rows[router][9]
        assert loss in readme, (router, loss)
        assert f"{float(rows_per_token):g}, {remote_bytes} B" in readme, (router, rows_per_token, remote_bytes)


# ------------------------------------------------------------------------------------------------ links


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: Path) -> set:
    text = FENCE.sub("", markdown.read_text())
    return {github_anchor(match.group(1)) for match in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: page.name)
def test_relative_links_and_pictures_resolve(page):
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert not broken, f"{page.name}: links that do not resolve: {broken}"


def test_flag_counts_are_those_of_the_parser_and_megatron_lms_table():
    from megatron_moe.arguments import build_parser
    from megatron_moe.arguments.megatron_lm import REFUSED

    reference = json.loads((REPO / "tests" / "megatron_lm" / "flags_core_v0.16.1.json").read_text())["flags"]
    actions = {option: action for action in build_parser()._actions for option in action.option_strings}
    accepted = [flag for flag in reference if flag not in REFUSED]
    idle = [flag for flag in accepted if getattr(actions[flag], "no_effect", None) is not None]
    text = " ".join(README.read_text().split())
    counts = (f"Of its {len(reference)} flags, {len(accepted)} are accepted: {len(accepted) - len(idle)} implemented, "
              f"and {len(idle)} that print one info line")
    assert counts in text and f"The other {len(reference) - len(accepted)} (" in text, counts
