"""Figures for the MLflow run page (`log_figure`): per SAE run its feature-density histogram,
decoder norms and strongest features; on a sweep's parent the L0 fronts. Matplotlib, off-screen."""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

TOP = 20
"""Features in the strongest-features bar chart."""


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def run_figures(table: dict[str, list[Any]]) -> dict[str, Figure]:
    """{artifact file: figure} from a feature table (columns as lists): `feature_density.png`
    (log10 firing frequency; dead latents counted apart), `decoder_norms.png`,
    `top_features.png` (the TOP largest max activations)."""
    out = {}
    freq = table["freq"]
    alive = [math.log10(f) for f in freq if f > 0]
    fig, ax = _figure(
        f"Feature density ({len(freq) - len(alive)} of {len(freq)} latents never fire)",
        "log10 firing frequency",
        "latents",
    )
    ax.hist(alive, bins=40, color="#4c72b0")
    out["feature_density.png"] = fig
    fig, ax = _figure("Decoder norms", "‖W_dec,i‖", "latents")
    ax.hist(table["decoder_norm"], bins=40, color="#55a868")
    out["decoder_norms.png"] = fig
    top = sorted(range(len(freq)), key=lambda i: -table["max_act"][i])[:TOP]
    fig, ax = _figure(f"The {len(top)} strongest features", "feature", "max activation")
    ax.bar([str(table["feature_id"][i]) for i in top], [table["max_act"][i] for i in top])
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    out["top_features.png"] = fig
    for f in out.values():
        f.tight_layout()
    return out


def front_figures(rows: list[dict[str, Any]], label: str = "overrides") -> dict[str, Figure]:
    """{artifact file: figure}: each run's L0 against explained variance and against loss
    recovered (`front_ev.png`, `front_loss_recovered.png`), labelled by `label`."""
    out = {}
    for metric, name in (
        ("eval_explained_variance", "ev"),
        ("eval_loss_recovered", "loss_recovered"),
    ):
        fig, ax = _figure(metric[5:].replace("_", " ") + " against L0", "L0", metric[5:])
        points = [r for r in rows if r.get("eval_l0") is not None and r.get(metric) is not None]
        ax.scatter([r["eval_l0"] for r in points], [r[metric] for r in points], color="#c44e52")
        for r in points:
            ax.annotate(str(r.get(label, ""))[:30], (r["eval_l0"], r[metric]), fontsize=7)
        fig.tight_layout()
        out[f"front_{name}.png"] = fig
    return out


def close(figures: dict[str, Figure]) -> None:
    for fig in figures.values():
        plt.close(fig)
