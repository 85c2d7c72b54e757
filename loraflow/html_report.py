"""One self-contained HTML report per run (`<run>/report.html`) and per grid (`<grid>/report.html`).

Self-contained: the pictures are embedded as data URIs and the style sheet is inline, so the file
can be mailed, attached to a ticket or opened from a tracker's artifacts and still shows everything.
No scripts: it renders the same everywhere, with nothing to fail.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from loraflow.layout import atomic_write_text, read_jsonl
from loraflow.report import RunResult, gate_verdict, outcome_table, promotion_line, scalar_metrics, verdict_word

SAMPLE_ROWS = 25
PICTURE_TITLES = {
    "loss_curve": "Loss and learning rate",
    "confusion_matrix": "Confusion matrix: base model and adapter",
    "leaderboard_chart": "Leaderboard",
    "metric_by_setting": "Ranking metric against each varied setting",
}

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #212121; margin: 0;
       background: #fafafa; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 30px 0 10px; border-bottom: 1px solid #e0e0e0; }
.meta { color: #616161; margin: 0 0 14px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 12px; font-weight: 600; font-size: 14px;
         vertical-align: middle; color: #fff; }
.passed, .pass { background: #2e7d32; } .failed_gates, .FAIL { background: #ef6c00; } .error, .skipped { background: #757575; }
.WARN { background: #fff3c4; color: #6d4c00; border: 1px solid #f9a825; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 14px; }
th, td { border: 1px solid #e0e0e0; padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.better { color: #2e7d32; } .worse { color: #c62828; }
figure { margin: 10px 0 22px; } figure img { max-width: 100%; height: auto; border: 1px solid #eeeeee; }
figcaption { color: #616161; font-size: 13px; }
code { font-size: 13px; background: #f5f5f5; padding: 1px 4px; border-radius: 3px; word-break: break-all; }
.sample { max-width: 560px; }
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """Cells are HTML already (escape text before)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header) if any(header) else ""
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _pictures(pictures: dict[str, str]) -> str:
    figures = []
    for key, path in pictures.items():
        if Path(path).is_file():
            title = PICTURE_TITLES.get(key, key)
            figures.append(f'<figure><img src="{data_uri(path)}" alt="{escape(title)}">'
                           f"<figcaption>{escape(title)}: <code>{escape(str(path))}</code></figcaption></figure>")
    return "".join(figures) or "<p>No pictures: the run logged no training steps.</p>"


def _page(title: str, body: str) -> str:
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
            f'<body><main>{body}<p class="meta">Written by loraflow, {written}.</p></main></body></html>\n')


def _comparison(result: RunResult) -> str:
    from loraflow.metrics import HIGHER_IS_BETTER

    rows = []
    for metric, value in scalar_metrics(result.metrics).items():
        base = result.baseline.get(metric)
        change = ""
        if isinstance(base, (int, float)):
            delta = value - base
            better = (delta >= 0) == HIGHER_IS_BETTER.get(metric, True)
            change = f'<span class="{"better" if better else "worse"}">{delta:+.4f}</span>'
        rows.append([escape(metric), _fmt(value), _fmt(base), change])
    return _table(["metric", "adapter", "base model", "change"], rows, numeric={1, 2, 3})


def _data_warnings(result: RunResult) -> str:
    """What the prepared data may train or score badly: a class the test split lacks goes unscored."""
    if not result.data_warnings:
        return ""
    items = "".join(f"<li>{escape(warning)}</li>" for warning in result.data_warnings)
    return f"<h2>Data warnings</h2><ul>{items}</ul>"


def _promotion(result: RunResult) -> str:
    """The alias decision and the comparison behind it: base model, champion, this adapter."""
    decision = result.promotion
    if decision is None:
        return "<p>Not registered.</p>"
    rows = [[escape(r.metric), _fmt(r.base), _fmt(r.champion), _fmt(r.candidate), _fmt(r.delta)]
            for r in decision.comparison]
    champion = f"champion v{decision.champion}" if decision.champion is not None else "champion"
    return (f"<p>{escape(promotion_line(decision, result.registry_version))}</p>"
            + _table(["metric", "base model", champion, "this adapter", "delta"], rows, numeric={1, 2, 3, 4}))


def _gates(result: RunResult) -> str:
    if not result.gates:
        return "<p>No gates set.</p>"
    rows = [[escape(g.metric), f"{'&ge;' if g.higher_is_better else '&le;'} {g.threshold:g}", _fmt(g.value),
             f'<span class="badge {verdict_word(g)}">{escape(gate_verdict(g))}</span>']
            for g in result.gates.values()]
    return _table(["gate", "threshold", "value", "verdict"], rows, numeric={2})


def _samples(path: str | None) -> str:
    if not path or not Path(path).is_file():
        return "<p>No sample predictions.</p>"
    rows = read_jsonl(path)[:SAMPLE_ROWS]
    if not rows:
        return "<p>No sample predictions.</p>"
    if "predicted" in rows[0]:
        table = [[f'<div class="sample">{escape(r["text"])}</div>', escape(str(r.get("label"))),
                  escape(str(r["predicted"])), "yes" if r.get("label") == r["predicted"] else "<b>no</b>"]
                 for r in rows]
        return _table(["text", "label", "predicted", "right"], table)
    table = [[f'<div class="sample">{escape(r.get(key) or "")}</div>' for key in ("prompt", "reference", "generated")]
             for r in rows]
    return _table(["prompt", "reference", "generated"], table)


def _training(result: RunResult) -> str:
    train = result.train
    keys = [("optimiser steps", "global_step"), ("epochs", "epochs"), ("training loss", "train_loss"),
            ("samples/s", "samples_per_second"), ("tokens/s", "tokens_per_second"), ("seconds", "train_runtime_s"),
            ("device", "device"), ("precision", "precision"), ("batch size", "batch_size"),
            ("gradient accumulation", "gradient_accumulation_steps"), ("resumed from step", "resumed_from_step")]
    rows = [[escape(label), escape(_fmt(train.get(key)))] for label, key in keys if key in train]
    rows += [[f"stage {escape(stage)}", f"{seconds:.1f} s{' (cached)' if result.cached.get(stage) else ''}"]
             for stage, seconds in result.timings.items()]
    return _table(["", ""], rows, numeric={1})


def _links(links: dict[str, str | None]) -> str:
    rows = []
    for label, target in links.items():
        if not target:
            continue
        shown = f'<a href="{escape(target)}">{escape(target)}</a>' if target.startswith("http") else \
            f"<code>{escape(target)}</code>"
        rows.append([escape(label), shown])
    return _table(["", ""], rows)


def run_report_html(result: RunResult, pictures: dict[str, str], tracker_links: dict[str, str | None]) -> str:
    counts = ", ".join(f"{split} {count}" for split, count in result.counts.items())
    body = "".join([
        f'<h1>{escape(result.name)} <span class="badge {escape(result.status)}">{escape(result.status)}</span></h1>',
        f'<p class="meta">{escape(result.task)} &middot; base model {escape(result.model)} &middot; rows: '
        f"{escape(counts)}</p>",
        _data_warnings(result),
        "<h2>Adapter against the base model (test split)</h2>", _comparison(result),
        "<h2>Quality gates</h2>", _gates(result),
        "<h2>Promotion</h2>", _promotion(result),
        "<h2>Pictures</h2>", _pictures(pictures),
        "<h2>Training</h2>", _training(result),
        "<h2>Sample predictions</h2>", _samples(result.paths.get("samples")),
        "<h2>Where things are</h2>",
        _links({"adapter": result.adapter_path,
                "registry": f"{result.name} v{result.registry_version}" if result.registry_version else None,
                "result.json": result.paths.get("result"), "resolved config": result.paths.get("config"),
                "dataset manifest": result.paths.get("manifest"), "Prefect flow run": result.flow_run_id,
                **tracker_links}),
    ])
    return _page(f"loraflow {result.name}: {result.status}", body)


def write_run_report(result: RunResult, pictures: dict[str, str], tracker_links: dict[str, str | None],
                     out: str | Path) -> Path:
    return atomic_write_text(out, run_report_html(result, pictures, tracker_links))


def grid_report_html(result, pictures: dict[str, str], baseline: dict[str, Any] | None,
                     tracker_links: dict[str, str | None], root: Path) -> str:
    """A variations grid: the leaderboard (each variant linked to its own report), its pictures, the best."""
    rows = outcome_table(result.leaderboard)
    columns = [c for c in rows[0] if c not in ("adapter", "error")] if rows else ["name"]
    cells = []
    for outcome, row in zip(result.leaderboard, rows):
        report = Path(outcome.result_path).parent / "report.html" if outcome.result_path else None
        line = []
        for column in columns:
            value = row[column]
            if column == "name" and report is not None and report.is_file():
                href = report.relative_to(root).as_posix() if report.is_relative_to(root) else report.as_uri()
                line.append(f'<a href="{escape(href)}">{escape(str(value))}</a>')
            elif column == "status":
                line.append(f'<span class="badge {escape(str(value))}">{escape(str(value))}</span>')
            else:
                line.append(escape(_fmt(value)))
        cells.append(line)
    base = baseline or {}
    best = (f"best: <b>{escape(result.best)}</b>, registered as {escape(str(result.registry_name))} "
            f"v{result.registry_version}" if result.best else "no variant passed its gates")
    errors = [[escape(o.name), escape(o.reason)] for o in result.leaderboard if o.failed]
    body = "".join([
        f'<h1>{escape(result.name)} <span class="badge {"passed" if result.ok else "failed_gates"}">'
        f'{"ok" if result.ok else "not ok"}</span></h1>',
        f'<p class="meta">variations of {escape(result.dataset)}, ranked by {escape(result.metric)} &middot; {best}</p>',
        "<h2>Leaderboard</h2>", _table(columns, cells, numeric=set(range(2, len(columns)))),
        f"<p>Base model {escape(result.metric)}: {escape(_fmt(base.get(result.metric)))}</p>" if base else "",
        "<h2>Pictures</h2>", _pictures(pictures),
        ("<h2>Failures</h2>" + _table(["variant", "why"], errors)) if errors else "",
        "<h2>Where things are</h2>",
        _links({"leaderboard.csv": result.paths.get("leaderboard"),
                "variations_result.json": result.paths.get("variations_result"), **tracker_links}),
    ])
    return _page(f"loraflow {result.name}: variations", body)


def write_grid_report(result, pictures: dict[str, str], baseline_path: str | None,
                      tracker_links: dict[str, str | None], out: str | Path) -> Path:
    baseline = json.loads(Path(baseline_path).read_text(encoding="utf-8")) if baseline_path and \
        Path(baseline_path).is_file() else None
    return atomic_write_text(out, grid_report_html(result, pictures, baseline, tracker_links, Path(out).parent))
