"""
Pictures of a run: the loss curves (loss.png) and the BLEU of each method (bleu.png). They need
matplotlib (`pip install matplotlib`), which the rest does not: without it, no picture is drawn
and nothing else changes.
"""

import csv
import io
import sys
from pathlib import Path

from machinery import cli
from mini_gpt2.fast import why
from mini_gpt2.files import write_bytes


def _pyplot():
    """matplotlib's pyplot, drawing to files, never to a window; None without it (cli.optional)."""
    matplotlib = cli.optional("matplotlib")
    if matplotlib is None:
        return None
    matplotlib.use("Agg")
    return cli.optional("matplotlib.pyplot")


def _draw(path, draw):
    """
    draw(pyplot) -> a figure, saved at `path` as a PNG. None without matplotlib, or if drawing failed
    in any way (one note): the pictures are never worth a run.
    """
    plt = _pyplot()
    if plt is None:
        return None
    try:
        fig = draw(plt)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    except Exception as e:
        print(f"note: matplotlib failed to draw {Path(path).name} ({why(e)}); going on without it", file=sys.stderr)
        return None
    write_bytes(path, buf.getvalue())
    return path


def smooth(values, weight):
    """An exponential moving average, corrected for its start (as TensorBoard draws it)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def loss_png(log_path, path, title):
    """Training loss (raw and smoothed) and validation loss against step, from log.csv, titled. None without matplotlib."""
    return _draw(path, lambda plt: _loss_figure(plt, log_path, title))


def _loss_figure(plt, log_path, title):
    with open(log_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"]]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(losses, 0.98 if len(losses) > 200 else 0.8), color="tab:blue", label="training (smoothed)")
    if val:
        ax.plot(*zip(*val), color="tab:orange", marker="o", markersize=3, label="validation")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per target token (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def bleu_png(scores, path, title):
    """Corpus BLEU of each method in each direction, as bars, in percent, titled. None without matplotlib."""
    return _draw(path, lambda plt: _bleu_figure(plt, scores, title))


def _bleu_figure(plt, scores, title):
    methods = list(dict.fromkeys(key.rsplit(" ", 1)[0] for key in scores))
    directions = list(dict.fromkeys(key.rsplit(" ", 1)[1] for key in scores))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        x = [d + (m - (len(methods) - 1) / 2) * width for d in range(len(directions))]
        bars = ax.bar(x, [scores[f"{method} {d}"]["corpus"] for d in directions], width, label=method)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(directions)), directions)
    ax.set_ylim(0, max([10.0] + [scores[k]["corpus"] * 1.15 for k in scores]))  # percent: 0 to 10 at least
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("corpus BLEU (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return fig
