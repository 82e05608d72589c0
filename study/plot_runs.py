"""Curves of TensorBoard scalars from several runs, one panel per tag: the figures of docs/train_*.md.

    python study/plot_runs.py --runs runs/AtomMem_SyntheticToy-v0__grpo__1__* runs/AtomMem_SyntheticToy-v0__grpo__2__* \
        --tags rollout/reward_mean eval/em_400 rollout/ops_create_per_episode --out grpo.png

Also prints each curve's first and last values, the means of its first and last `--window` points
and its median, so the numbers quoted next to a figure come from it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import tyro


@dataclass
class Args:
    runs: tuple[str, ...]
    """run directories (each holding an events.out.tfevents.* file)"""
    tags: tuple[str, ...] = ("rollout/reward_mean", "eval/em_400", "rollout/ops_create_per_episode",
                             "rollout/ops_read_per_episode")
    """scalar tags to plot, one panel each"""
    out: str = "curves.png"
    """where the figure goes"""
    labels: list[str] = field(default_factory=list)
    """legend label per run (default: the run directory's name)"""
    window: int = 10
    """points averaged at each end of a curve in the printed summary"""


def read_scalars(run: Path, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not list(run.glob("events.out.tfevents.*")):
        raise SystemExit(f"error: {run} holds no TensorBoard event file")
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    available = set(events.Tags()["scalars"])
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags if tag in available}


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.labels and len(args.labels) != len(args.runs):
        raise SystemExit("error: give one --labels entry per run")
    if args.window < 1:
        raise SystemExit("error: --window must be at least 1")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(args.tags))
    rows = math.ceil(len(args.tags) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    for index, run in enumerate(args.runs):
        label = args.labels[index] if args.labels else Path(run).name
        curves = read_scalars(Path(run), args.tags)
        for panel, tag in zip(axes.flat, args.tags):
            if tag not in curves:
                print(f"{label}: no {tag}")
                continue
            steps, values = zip(*curves[tag])
            panel.plot(steps, values, marker="." if len(steps) < 12 else None, label=label)
            panel.set_title(tag)
            w = min(args.window, len(values))
            print(f"{label}: {tag} {values[0]:.3f} (step {steps[0]}) -> {values[-1]:.3f} (step {steps[-1]}), "
                  f"{len(values)} points; mean of first/last {w}: {statistics.fmean(values[:w]):.3f} -> "
                  f"{statistics.fmean(values[-w:]):.3f}; median {statistics.median(values):.3f}")
    for panel in axes.flat[len(args.tags):]:
        panel.axis("off")
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
