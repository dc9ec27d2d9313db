"""PNG figures of the analysis results in the style of the paper's figures 2-5 (matplotlib Agg).

Each function takes a summary dict as written by `himap analyze ...` and a path, and returns
the path. Layers are 0-based as everywhere in the project.
"""

from __future__ import annotations


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(ax, layers, values, label, **kw):
    pts = [(l, v) for l, v in zip(layers, values) if v is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label, **kw)
    return [p[1] for p in pts]


def _finish(ax, values, ylabel, title):
    if values and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_xlabel("layer (0-based)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_modalities(means: dict, path: str, title: str = "Contribution of each modality (fig. 2)") -> str:
    """Per-layer S_sys, S_img, S_ins (eqs. 2-4) from saliency means."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    vals = []
    for key, label in (("S_sys", "$S_{sys}$ (system)"), ("S_img", "$S_{img}$ (image)"),
                       ("S_ins", "$S_{ins}$ (instruction)")):
        vals += _curve(ax, means["layers"], means[key], label)
    _finish(ax, vals, "saliency per token", title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_visual_flows(means: dict, path: str, title: str = "Intra-visual vs visual-textual flow (fig. 3)") -> str:
    """Per-layer S_vv and S_vt (eqs. 5-6) from saliency means."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    vals = _curve(ax, means["layers"], means["S_vv"], "$S_{vv}$ (image -> image)")
    vals += _curve(ax, means["layers"], means["S_vt"], "$S_{vt}$ (image -> instruction)")
    _finish(ax, vals, "saliency per image token", title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_consistency(summary: dict, path: str, flows=("img2ins", "img2rnd"),
                     title: str = "Consistency after disruption (fig. 4)") -> str:
    """Label and score consistency per blocked window, one bar per flow."""
    plt = _pyplot()
    conds = summary["conditions"]
    windows = list(dict.fromkeys(c["window"] for c in conds.values()))
    flows = [f for f in flows if any(c["flow"] == f for c in conds.values())] or \
        list(dict.fromkeys(c["flow"] for c in conds.values()))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.1 * len(windows) + 3), 3.6), sharey=True)
    width = 0.8 / max(1, len(flows))
    for ax, metric, label in zip(axes, ("label_consistency", "score_consistency"),
                                 ("label consistency", "score consistency (top-5 Jaccard)")):
        for k, flow in enumerate(flows):
            ys = [conds.get(f"{flow}@{w}", {}).get(metric) for w in windows]
            xs = [i + (k - (len(flows) - 1) / 2) * width for i in range(len(windows))]
            ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None],
                   width=width, label=flow)
        ax.set_xticks(range(len(windows)))
        ax.set_xticklabels(windows, rotation=45, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("fraction of samples")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_d_values(summary: dict, path: str, title: str = "$D_l = \\log(E_{vv}/E_{vt})$ per window (fig. 5)") -> str:
    """D per window (eq. 7); windows where D is undefined are marked 'n/a'."""
    plt = _pyplot()
    d = summary.get("D", {})
    windows = list(d)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(windows) + 2), 3.6))
    for i, w in enumerate(windows):
        v = d[w]["D"]
        if v is None:
            ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        else:
            ax.bar(i, v, color="tab:red" if v > 0 else "tab:blue")
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlim(-0.6, len(windows) - 0.4)
    if all(d[w]["D"] is None for w in windows):
        ax.set_ylim(-1, 1)
    ax.set_xticks(range(len(windows)))
    ax.set_xticklabels(windows, rotation=45, ha="right")
    ax.set_xlabel("blocked layers")
    ax.set_ylabel("$D_l$")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
