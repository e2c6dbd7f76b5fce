"""A picture of what pp kept: per layer, how often each head / MLP channel was kept across calls.
Needs matplotlib (`pip install ppcompile[plot]`)."""
from __future__ import annotations

from pathlib import Path

import torch

from .runtime import Runtime


def plot_kept(runtime: Runtime, path: str | Path, title: str = "") -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install 'ppcompile[plot]'") from e
    kinds = [k for k in ("attention", "mlp") if any(i["kind"] == k for i in runtime.sites.values())]
    if not kinds:
        raise ValueError("nothing was recorded: run some batches with telemetry=True first")
    fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 6), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * len(kinds)})
    for ax, kind in zip(axes[0], kinds):
        sites = sorted((i["layer"], s) for s, i in runtime.sites.items() if i["kind"] == kind)
        grid = torch.stack([runtime.kept_frequency(s) for _, s in sites]).numpy()  # (layers, units)
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(sites)), [str(layer) for layer, _ in sites])
        ax.set_ylabel("decoder layer (pruned layers only)")
        ax.set_xlabel("query head" if kind == "attention" else "MLP channel")
        ax.set_title(f"{kind}: fraction of {max(r['calls'] for r in runtime.stats())} calls that kept each "
                     f"{'head' if kind == 'attention' else 'channel'}")
        fig.colorbar(image, ax=ax, fraction=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
