#!/usr/bin/env python3
"""README's two diagrams, drawn with matplotlib (Agg) into docs/images/:

    python benchmarks/diagrams.py [--out docs/images]

- ``sam_vs_topk_dispatch.png``: what one token sends through the expert-parallel all-to-all. Top-k routing
  (megatron's, k = 2) sends one row (the token's hidden vector) per chosen expert, to up to k devices; SAM
  sends one row to the one device holding its chosen group, where its k experts share it.
- ``rank_layout.png``: how TP, PP, DP and EP map onto the ranks of one example job (16 GPUs on 2 nodes, TP 2,
  PP 2, EP 4), with the groups taken from megatron-core's own ``RankGenerator`` in the order our jobs use
  (``initialize_model_parallel``'s default, tp-cp-ep-dp-pp: TP varies fastest, PP slowest).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ORDER = "tp-cp-ep-dp-pp"  # megatron-core's default, the one training.setup leaves in place
DEVICES, EXPERTS_PER_DEVICE = 4, 2
COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7"]


# ------------------------------------------------------------------------------------ dispatch diagram


def _device(axis, x: float, name: str, experts: List[int], chosen: List[int]) -> Dict[int, tuple]:
    """One EP rank with its experts; returns each expert's box centre."""
    axis.add_patch(FancyBboxPatch((x, 0.0), 1.6, 2.2, boxstyle="round,pad=0.05", facecolor="#f4f4f4",
                                  edgecolor="#555555"))
    axis.text(x + 0.8, 2.35, name, ha="center", fontsize=9)
    centres = {}
    for i, expert in enumerate(experts):
        y = 1.25 - i * 0.9
        active = expert in chosen
        axis.add_patch(FancyBboxPatch((x + 0.2, y), 1.2, 0.65, boxstyle="round,pad=0.03",
                                      facecolor="#f28e2b" if active else "white", edgecolor="#555555"))
        axis.text(x + 0.8, y + 0.32, f"expert {expert}", ha="center", va="center", fontsize=8,
                  fontweight="bold" if active else "normal")
        centres[expert] = (x + 0.8, y + 0.65)
    return centres


def _dispatch_panel(axis, title: str, chosen: List[int], rows_to: List[int], note: str) -> None:
    axis.set_xlim(-0.3, 8.6)
    axis.set_ylim(-1.1, 5.6)
    axis.axis("off")
    axis.set_title(title, fontsize=11)
    token = (4.15, 4.6)
    axis.add_patch(FancyBboxPatch((token[0] - 0.9, token[1] - 0.3), 1.8, 0.6, boxstyle="round,pad=0.05",
                                  facecolor="#4e79a7", edgecolor="#4e79a7"))
    axis.text(*token, "a token on EP rank 0", ha="center", va="center", color="white", fontsize=8)
    tops = {}
    for device in range(DEVICES):
        experts = [device * EXPERTS_PER_DEVICE + i for i in range(EXPERTS_PER_DEVICE)]
        centres = _device(axis, device * 2.2, f"EP rank {device}", experts, chosen)
        tops[device] = (device * 2.2 + 0.8, 2.3)
    for device in rows_to:
        axis.add_patch(FancyArrowPatch((token[0], token[1] - 0.32), tops[device], arrowstyle="-|>",
                                       mutation_scale=14, linewidth=2.2, color="#e15759"))
        axis.text((token[0] + tops[device][0]) / 2 + 0.15, (token[1] + tops[device][1]) / 2 - 0.1,
                  "1 row", color="#e15759", fontsize=8)
    axis.text(4.15, -0.35, note, ha="center", va="top", fontsize=9)


def draw_dispatch(path: Path) -> Path:
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    _dispatch_panel(axes[0], "top-k (k = 2): one row per chosen expert", chosen=[2, 7], rows_to=[1, 3],
                    note="k rows of H values, to up to k EP ranks, and k rows back")
    _dispatch_panel(axes[1], "SAM (k = 2, group = one EP rank): one row per token", chosen=[4, 5], rows_to=[2],
                    note="1 row (H values + k gates + k expert ids) to 1 EP rank, whose k experts share it;\n"
                         "1 combined row back")
    figure.suptitle("What one token sends through the expert-parallel all-to-all (8 experts on 4 EP ranks)",
                    fontsize=12)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------------ rank layout diagram


def rank_groups(world: int, tp: int, pp: int, ep: int, etp: int) -> Dict[str, List[List[int]]]:
    """The process groups megatron-core builds for this layout (context parallel 1), by its RankGenerator."""
    from megatron.core.parallel_state import RankGenerator

    dp = world // (tp * pp)
    dense = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order=ORDER)
    expert = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1, order=ORDER)
    return {"TP": dense.get_ranks("tp"), "DP": dense.get_ranks("dp"), "PP": dense.get_ranks("pp"),
            "EP": expert.get_ranks("ep"), "expert DP": expert.get_ranks("dp")}


def draw_rank_layout(path: Path, world: int = 16, per_node: int = 8, tp: int = 2, pp: int = 2, ep: int = 4) -> Path:
    groups = rank_groups(world, tp, pp, ep, etp=tp)
    rows = ["TP", "DP", "EP", "PP"]
    meaning = {
        "TP": f"TP {tp}: attention and MLP weights split; a pair of neighbouring ranks (same node)",
        "DP": f"DP {world // (tp * pp)}: replicas of the dense weights; gradients all-reduced",
        "EP": f"EP {ep} (ETP = TP = {tp}): a layer's experts spread over {ep} ranks, tokens sent all-to-all inside "
              "the node; here each EP group is a DP group (expert DP 1: each expert lives on one TP pair)",
        "PP": f"PP {pp}: stage 0 (layers 1-12) on node 0, stage 1 (layers 13-24) on node 1",
    }
    figure, axis = plt.subplots(figsize=(13, 6.2))
    axis.set_xlim(-3.2, world + 0.3)
    axis.set_ylim(-1.2, len(rows) * 1.35 + 0.6)
    axis.axis("off")
    for row_index, name in enumerate(rows):
        y = (len(rows) - 1 - row_index) * 1.35
        colour_of = {rank: COLORS[i % len(COLORS)] for i, group in enumerate(groups[name]) for rank in group}
        group_of = {rank: i for i, group in enumerate(groups[name]) for rank in group}
        axis.text(-3.1, y + 0.35, name, fontsize=12, fontweight="bold", va="center")
        for rank in range(world):
            x = rank + (0.25 if rank >= per_node else 0.0)
            axis.add_patch(FancyBboxPatch((x, y), 0.82, 0.7, boxstyle="round,pad=0.02",
                                          facecolor=colour_of[rank], edgecolor="white", alpha=0.9))
            axis.text(x + 0.41, y + 0.45, str(rank), ha="center", va="center", color="white", fontsize=9,
                      fontweight="bold")
            axis.text(x + 0.41, y + 0.15, f"g{group_of[rank]}", ha="center", va="center", color="white", fontsize=7)
        axis.text(-3.1, y - 0.2, meaning[name], fontsize=8, va="center")
    for node in range(world // per_node):
        start = node * per_node + (0.25 if node else 0.0)
        axis.text(start + per_node / 2 - 0.1, len(rows) * 1.35 + 0.2, f"node {node}: GPUs 0-{per_node - 1}",
                  ha="center", fontsize=10)
    axis.text(world / 2 - 1.5, -1.0,
              f"ranks 0-{world - 1}; colour and g = the rank's group in that dimension (megatron-core's order "
              f"{ORDER}: TP varies fastest, PP slowest)", ha="center", fontsize=9)
    figure.suptitle(f"{world} GPUs on {world // per_node} nodes: --tensor-model-parallel-size {tp} "
                    f"--pipeline-model-parallel-size {pp} --expert-model-parallel-size {ep}", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (draw_dispatch(args.out / "sam_vs_topk_dispatch.png"), draw_rank_layout(args.out / "rank_layout.png")):
        print(path)


if __name__ == "__main__":
    main()
