"""PNG pictures of a run, written next to the data they show.

- `<run>/logs/loss.png`: training and validation loss against optimiser steps, and the learning rate
  (from `logs/metrics.jsonl`);
- `<run>/eval/confusion_matrix.png`: classification only, the base model's and the adapter's
  confusion matrices side by side (from `eval/baseline.json` and `eval/metrics.json`);
- `<grid>/metric_by_setting.png` and `<grid>/leaderboard.png`: a variations grid's ranking metric
  against each varied setting, and its variants ranked.

Each picture is drawn by a `draw_*` function that returns its matplotlib Figure (what tests read:
titles, labels, plotted data) and is saved apart. matplotlib is imported inside the functions, with
its object-oriented API and the Agg canvas (files only: no display, no pyplot global state, so
sibling subflows in threads may draw at once); importing loraflow never loads it. Each PNG carries a hash of what it was drawn from (a tEXt chunk); a picture
whose inputs have not changed (a cached re-run) is kept as it is, and matplotlib is not even imported.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from loraflow.fingerprint import hash_bytes, hash_json
from loraflow.layout import atomic_write_bytes, read_jsonl

DPI = 110
PASSED, FAILED, BROKEN = "#2e7d32", "#ef6c00", "#9e9e9e"
STATUS_COLOUR = {"passed": PASSED, "failed_gates": FAILED, "error": BROKEN, "skipped": BROKEN}
STATUS_TEXT = {"passed": "gates passed", "failed_gates": "gates failed", "error": "error", "skipped": "skipped"}
INPUTS_KEY = "loraflow-inputs"
_DRAWING_CODE = hash_bytes(Path(__file__).read_bytes())  # a change to how pictures are drawn redraws them


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(figure, path: str | Path, key: str) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={INPUTS_KEY: key})  # a bare Figure draws with Agg
    return atomic_write_bytes(path, buffer.getvalue())


def inputs_key(*inputs: Any) -> str:
    return hash_json([_DRAWING_CODE, *inputs])


def drawn_from(path: str | Path) -> str | None:
    """The inputs hash a loraflow PNG was saved with, read from its tEXt chunks (no image library)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    position = 8
    while position + 8 <= len(data):
        length, kind = int.from_bytes(data[position:position + 4], "big"), data[position + 4:position + 8]
        if kind == b"IDAT":
            return None
        if kind == b"tEXt":
            keyword, _, text = data[position + 8:position + 8 + length].partition(b"\0")
            if keyword.decode("latin-1") == INPUTS_KEY:
                return text.decode("latin-1")
        position += 12 + length
    return None


def _current(out: str | Path, key: str) -> Path | None:
    """`out` when it was drawn from exactly these inputs, so it need not be drawn again."""
    return Path(out) if drawn_from(out) == key else None


def training_history(metrics_jsonl: str | Path) -> dict[str, list[tuple[int, float]]]:
    """`{"loss": [(step, value), ...], "eval_loss": ..., "learning_rate": ..., "epoch": ...}` from
    the Trainer's log lines; a resumed run logs some steps twice, and the later line wins."""
    by_key: dict[str, dict[int, float]] = {}
    for record in read_jsonl(metrics_jsonl):
        step = record.get("step")
        if not isinstance(step, int) or "train_runtime" in record:  # the end-of-training summary line
            continue
        for key in ("loss", "eval_loss", "learning_rate", "epoch"):
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                by_key.setdefault(key, {})[step] = float(value)
    return {key: sorted(values.items()) for key, values in by_key.items()}


def loss_curve(metrics_jsonl: str | Path, out: str | Path, name: str) -> Path | None:
    """Loss (training and validation) above, learning rate below, against optimiser steps; None
    when the log holds no loss (training was never logged)."""
    if not Path(metrics_jsonl).is_file():
        return None
    key = inputs_key("loss", name, hash_bytes(Path(metrics_jsonl).read_bytes()))
    history = training_history(metrics_jsonl)
    if not history.get("loss") and not history.get("eval_loss"):
        return None
    if kept := _current(out, key):
        return kept
    return _save(draw_loss_curve(history, name), out, key)


def draw_loss_curve(history: dict[str, list[tuple[int, float]]], name: str):
    """The loss curve's matplotlib Figure, from `training_history`'s points."""
    figure = _figure(7.5, 5.2)
    loss_axes, rate_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1.3))
    if history.get("loss"):
        steps, values = zip(*history["loss"])
        loss_axes.plot(steps, values, color="#1565c0", linewidth=1.8, label="training loss")
    if history.get("eval_loss"):
        steps, values = zip(*history["eval_loss"])
        loss_axes.plot(steps, values, color="#c62828", linewidth=1.8, marker="o", markersize=5,
                       label="validation loss")
        loss_axes.annotate(f"last {values[-1]:.3f}", (steps[-1], values[-1]), textcoords="offset points",
                           xytext=(0, 9), ha="right", color="#c62828", fontsize=9)
    loss_axes.set_ylabel("loss (cross-entropy, nats)")
    loss_axes.set_ylim(bottom=0)
    loss_axes.grid(alpha=0.3)
    loss_axes.legend(loc="upper right", frameon=False)
    figure.suptitle(f"{name}: loss and learning rate during training", fontsize=12)
    _epoch_axis(loss_axes, history.get("epoch", []))
    if history.get("learning_rate"):
        steps, values = zip(*history["learning_rate"])
        rate_axes.plot(steps, values, color="#6a1b9a", linewidth=1.5)
        rate_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    rate_axes.set_ylabel("learning rate")
    rate_axes.set_xlabel("optimiser step")
    rate_axes.set_ylim(bottom=0)
    rate_axes.grid(alpha=0.3)
    return figure


def _epoch_axis(axes, epochs: list[tuple[int, float]]) -> None:
    """Epochs along the top, when the log says how steps map to epochs."""
    last = next(((step, epoch) for step, epoch in reversed(epochs) if step > 0 and epoch > 0), None)
    if last is None:
        return
    steps_per_epoch = last[0] / last[1]
    top = axes.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
    top.set_xlabel("epoch", fontsize=9)


def confusion_matrices(adapter: dict[str, Any], baseline: dict[str, Any] | None, out: str | Path,
                       name: str) -> Path | None:
    """The base model's and the adapter's confusion matrices on the test split, on one colour scale;
    None when the metrics hold no confusion matrix (not a classification run)."""
    panels = [(title, metrics) for title, metrics in (("base model, no adapter", baseline), ("with the adapter", adapter))
              if metrics and metrics.get("confusion_matrix")]
    if not any(title == "with the adapter" for title, _ in panels):
        return None
    key = inputs_key("confusion", name, panels)
    if kept := _current(out, key):
        return kept
    return _save(draw_confusion_matrices(adapter, panels, name), out, key)


def draw_confusion_matrices(adapter: dict[str, Any], panels: list[tuple[str, dict[str, Any]]], name: str):
    """The confusion matrices' matplotlib Figure: one panel per `(title, metrics)`, on one colour scale."""
    labels = adapter.get("labels") or [str(i) for i in range(len(adapter["confusion_matrix"]))]
    size = len(labels)
    side = min(6.0, max(3.2, 0.55 * size + 1.8))
    figure = _figure(side * len(panels) + 1.0, side + 0.8)
    axes_list = figure.subplots(1, len(panels), squeeze=False)[0]
    biggest = max(max(max(row) for row in metrics["confusion_matrix"]) for _, metrics in panels) or 1
    image = None
    for axes, (title, metrics) in zip(axes_list, panels):
        matrix = metrics["confusion_matrix"]
        image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=biggest)
        accuracy = metrics.get("accuracy")
        subtitle = f"{title}\naccuracy {accuracy:.1%}" if isinstance(accuracy, (int, float)) else title
        axes.set_title(subtitle, fontsize=10)
        axes.set_xticks(range(size), labels, rotation=45 if size > 3 else 0, ha="right" if size > 3 else "center")
        axes.set_yticks(range(size), labels)
        axes.set_xlabel("predicted label")
        axes.set_ylabel("true label")
        if size <= 15:
            for row, counts in enumerate(matrix):
                for column, count in enumerate(counts):
                    axes.text(column, row, str(count), ha="center", va="center", fontsize=9,
                              color="white" if count > biggest * 0.6 else "#212121")
    examples = adapter.get("num_examples") or sum(map(sum, adapter["confusion_matrix"]))
    figure.suptitle(f"{name}: confusion matrix on the test split ({examples} examples)", fontsize=12)
    from matplotlib.ticker import MaxNLocator

    figure.colorbar(image, ax=list(axes_list), shrink=0.8, label="examples", ticks=MaxNLocator(integer=True))
    return figure


def _read_json(path: str | Path | None) -> dict[str, Any] | None:
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def run_pictures(run_root: str | Path, name: str, baseline_path: str | None = None) -> dict[str, str]:
    """Every picture of one run that its files allow: `{"loss_curve": path, "confusion_matrix": path}`."""
    root = Path(run_root)
    pictures = {"loss_curve": loss_curve(root / "logs" / "metrics.jsonl", root / "logs" / "loss.png", name)}
    metrics = _read_json(root / "eval" / "metrics.json")
    if metrics:
        baseline = _read_json(baseline_path or root / "eval" / "baseline.json")
        pictures["confusion_matrix"] = confusion_matrices(metrics, baseline, root / "eval" / "confusion_matrix.png", name)
    return {key: str(path) for key, path in pictures.items() if path is not None}


# A variations grid ---------------------------------------------------------------------------------


def _value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _metric_label(metric: str) -> str:
    """An axis label for a test metric, with its unit where it has one."""
    return f"{metric} (test split{', nats' if metric == 'eval_loss' else ''})"


def _settings_and_scored(rows: list[dict[str, Any]], metric: str) -> tuple[list[str], list[dict[str, Any]]]:
    settings = list(dict.fromkeys(key for row in rows for key in row["values"]))
    return settings, [row for row in rows if isinstance(row["metrics"].get(metric), (int, float))]


def metric_by_setting(rows: list[dict[str, Any]], metric: str, out: str | Path, name: str) -> Path | None:
    """One panel per varied setting: each variant's `metric` at its value of that setting, the best
    per value joined by a line. `rows`: `{"name", "status", "values": {...}, "metrics": {...}}`."""
    settings, scored = _settings_and_scored(rows, metric)
    if not settings or not scored:
        return None
    key = inputs_key("by-setting", name, metric, rows)
    if kept := _current(out, key):
        return kept
    return _save(draw_metric_by_setting(rows, metric, name), out, key)


def draw_metric_by_setting(rows: list[dict[str, Any]], metric: str, name: str):
    """`metric_by_setting`'s matplotlib Figure (rows with at least one varied setting and one score).
    "Best" is the metric's better way: the lowest eval_loss, the highest accuracy."""
    from loraflow.metrics import HIGHER_IS_BETTER

    settings, scored = _settings_and_scored(rows, metric)
    better = max if HIGHER_IS_BETTER.get(metric, True) else min
    figure = _figure(max(4.2, 3.6 * len(settings)), 3.9)
    axes_list = figure.subplots(1, len(settings), squeeze=False, sharey=True)[0]
    for axes, setting in zip(axes_list, settings):
        values = sorted({row["values"].get(setting) for row in scored}, key=lambda v: (isinstance(v, str), v))
        position = {value: index for index, value in enumerate(values)}
        for row in scored:
            axes.scatter(position[row["values"].get(setting)], row["metrics"][metric], s=46, zorder=3,
                         color=STATUS_COLOUR.get(row["status"], BROKEN), edgecolor="white", linewidth=0.8)
        best = [better(r["metrics"][metric] for r in scored if r["values"].get(setting) == v) for v in values]
        axes.plot(range(len(values)), best, color="#424242", linewidth=1, alpha=0.6, zorder=2, label="best at value")
        axes.set_xticks(range(len(values)), [_value_text(v) for v in values])
        axes.set_xlim(-0.5, len(values) - 0.5)
        axes.set_xlabel(setting)
        axes.grid(alpha=0.3)
    axes_list[0].set_ylabel(_metric_label(metric))
    _status_legend(figure, {row["status"] for row in scored})
    figure.suptitle(f"{name}: {metric} against each varied setting", fontsize=12)
    return figure


def _status_legend(figure, statuses: set[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=STATUS_COLOUR[s], label=STATUS_TEXT[s])
               for s in STATUS_COLOUR if s in statuses]
    handles.append(Line2D([], [], color="#424242", alpha=0.6, label="best at each value"))
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=9)


def leaderboard_chart(rows: list[dict[str, Any]], metric: str, out: str | Path, name: str,
                      baseline: float | None = None, threshold: float | None = None) -> Path | None:
    """Variants as horizontal bars, best on top, coloured by gate verdict; the base model and the
    gate threshold as lines. `rows` are best first, as the leaderboard ranks them."""
    if not rows:
        return None
    key = inputs_key("leaderboard", name, metric, rows, baseline, threshold)
    if kept := _current(out, key):
        return kept
    return _save(draw_leaderboard_chart(rows, metric, name, baseline, threshold), out, key)


def draw_leaderboard_chart(rows: list[dict[str, Any]], metric: str, name: str, baseline: float | None = None,
                           threshold: float | None = None):
    """`leaderboard_chart`'s matplotlib Figure (at least one row)."""
    figure = _figure(9.0, 1.5 + 0.42 * len(rows))
    axes = figure.subplots()
    labels = [row["name"] for row in rows][::-1]
    values = [row["metrics"].get(metric) for row in rows][::-1]
    colours = [STATUS_COLOUR.get(row["status"], BROKEN) for row in rows][::-1]
    usable = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in values]
    bars = axes.barh(range(len(rows)), usable, color=colours, height=0.62)
    for bar, value in zip(bars, values):
        text = f"{value:.4f}" if isinstance(value, (int, float)) else "no result"
        axes.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {text}", va="center", fontsize=9)
    axes.set_yticks(range(len(rows)), labels, fontsize=9)
    if baseline is not None:
        axes.axvline(baseline, color="#212121", linestyle=":", linewidth=1.3, label=f"base model {baseline:.4f}")
    if threshold is not None:
        axes.axvline(threshold, color="#c62828", linestyle="--", linewidth=1.3, label=f"gate {threshold:g}")
    from matplotlib.patches import Patch

    handles = [Patch(color=STATUS_COLOUR[s], label=STATUS_TEXT[s]) for s in STATUS_COLOUR
               if s in {row["status"] for row in rows}]
    axes.legend(handles=[*handles, *axes.get_legend_handles_labels()[0]], loc="center left", bbox_to_anchor=(1.01, 0.5),
                fontsize=8, frameon=False)
    axes.set_xlim(0, max([*usable, baseline or 0, threshold or 0, 1e-9]) * 1.18)
    axes.set_xlabel(_metric_label(metric))
    axes.set_title(f"{name}: variants ranked by {metric}", fontsize=12, loc="left")
    axes.grid(axis="x", alpha=0.3)
    return figure


def grid_pictures(grid_root: str | Path, name: str, rows: list[dict[str, Any]], metric: str,
                  baseline: float | None = None, threshold: float | None = None) -> dict[str, str]:
    """A grid's pictures in its folder: `{"metric_by_setting": path, "leaderboard_chart": path}`."""
    root = Path(grid_root)
    pictures = {
        "metric_by_setting": metric_by_setting(rows, metric, root / "metric_by_setting.png", name),
        "leaderboard_chart": leaderboard_chart(rows, metric, root / "leaderboard.png", name, baseline, threshold),
    }
    return {key: str(path) for key, path in pictures.items() if path is not None}
