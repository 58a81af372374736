"""Figures of an evaluation: matplotlib without a screen, the Pareto plot, the labelled image grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..eval.images import image_grid, save_image
from ..files import atomic_write
from .methods import family_role

__all__ = ["pyplot", "save_figure", "pareto_plot", "method_grid", "STYLES", "style", "curves"]

# how the Pareto plot draws a family, by its role in the method registry (`eval.methods.family_role`): attnreuse's
# own methods as solid curves of circles on top, the peers as squares joined by dotted lines, step reduction grey
STYLES = {
    "baseline": dict(marker="o", linestyle="-", linewidth=1, color="0.45", zorder=2),
    "attnreuse": dict(marker="o", linestyle="-", linewidth=1.5, zorder=4),
    "peer": dict(marker="s", linestyle=":", linewidth=1, markersize=5, zorder=3),
}


def pyplot():
    """matplotlib's pyplot on the Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 120) -> None:
    """Save and close a figure, atomically."""
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".")))
    pyplot().close(fig)


def style(family: str, frontier: bool = False) -> dict:
    """The matplotlib keywords of a family's curve: its role's `STYLES`, labelled (attnreuse's own families say so
    in the legend); a `frontier` one drawn thicker."""
    role = family_role(family)
    label = f"{family} (attnreuse)" if role == "attnreuse" else family
    return dict(STYLES[role], label=label, **({"linewidth": 2.5} if frontier else {}))


def curves(rows: list[dict], lines: tuple[str, ...] = ()) -> list[tuple[str, list[dict], dict]]:
    """(family, its rows by latency, its `style`) of every family the Pareto plot draws: all but the reference's
    and the rows that did not run; families in `lines` drawn as a frontier."""
    families = {}
    for r in rows:
        if "error" not in r and family_role(r["family"]) != "reference":
            families.setdefault(r["family"], []).append(r)
    return [(name, sorted(members, key=lambda r: r["latency_ratio"]), style(name, name in lines))
            for name, members in families.items()]


def pareto_plot(rows: list[dict], path, title: str, lines: tuple[str, ...] = ()) -> None:
    """PSNR against latency relative to full, one curve per family, styled by its role (`STYLES`); families in
    `lines` drawn as a frontier."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for _, members, kwargs in curves(rows, lines):
        ax.plot([r["latency_ratio"] for r in members], [r["psnr_db"] for r in members], **kwargs)
        for r in members:
            label = Path(r["method"]).stem if r["method"].endswith(".json") else r["method"].split(":")[-1]
            ax.annotate(label, (r["latency_ratio"], r["psnr_db"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set(xlabel="latency relative to full (lower is faster)", ylabel="PSNR vs full (dB)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def method_grid(result: dict, path, columns: int = 6) -> list[str]:
    """A grid with one row per method (its first `columns` images), each row labelled with the method, its
    latency and PSNR; returns the labels, top to bottom."""
    rows = {r["method"]: r for r in result["rows"] if "error" not in r}
    shown = [s for s, images in result["images"].items() if images is not None and s in rows]
    labels = [s if s == "full" else f"{s}  {rows[s]['latency_ratio']:.2f}x  {rows[s]['psnr_db']:.1f} dB"
              for s in shown]
    tiles = np.concatenate([result["images"][s][:columns] for s in shown])
    save_image(image_grid(tiles, columns=min(columns, len(result["images"]["full"])), labels=labels), path)
    return labels
