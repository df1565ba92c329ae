"""The timestep groups as a table and a picture: a timeline of the groups, and HTG's dendrogram."""

from __future__ import annotations

from pathlib import Path


def groups_table(groups) -> str:
    lines = [f"{'group':>5}  {'timesteps':>11}  {'count':>5}"]
    lines += [f"{g.index:>5}  {f'{g.start}..{g.end}':>11}  {g.end - g.start + 1:>5}" for g in groups]
    return "\n".join(lines)


def plot_groups(groups, history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if history else 1
    fig, axes = plt.subplots(rows, 1, figsize=(9, 1.6 + 2.6 * (rows - 1)), squeeze=False)
    timeline = axes[-1][0]
    colors = plt.get_cmap("tab10")
    for g in groups:
        timeline.barh(0, g.end - g.start + 1, left=g.start, color=colors(g.index % 10), edgecolor="black")
        timeline.text((g.start + g.end) / 2, 0, f"g{g.index}\n{g.start}-{g.end}", ha="center", va="center", fontsize=7)
    timeline.set_xlim(0, groups[-1].end + 1)
    timeline.set_yticks([])
    timeline.set_xlabel("timestep")
    if history:
        import numpy as np
        from scipy.cluster.hierarchy import dendrogram

        merges = history["merges"]
        linkage = np.array([[m.left, m.right, m.distance, m.size] for m in merges], dtype=float)
        linkage[:, 2] = np.maximum.accumulate(linkage[:, 2])  # greedy merging need not be monotone
        labels = [str(t) for t in history["timesteps"]]
        dendrogram(linkage, labels=labels, ax=axes[0][0], leaf_font_size=6, color_threshold=0)
        if len(groups) > 1:
            # between the last merge performed and the first one refused
            cut = (linkage[-len(groups), 2] + linkage[-len(groups) + 1, 2]) / 2
            axes[0][0].axhline(cut, color="red", linestyle="--", linewidth=1)
        axes[0][0].set_ylabel("distance between group means")
        axes[0][0].set_title("HTG: neighbouring timesteps merged bottom-up (leaves: calibrated timesteps)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
