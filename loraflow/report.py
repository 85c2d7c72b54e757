"""The run's `result.json` and its human summaries (terminal text and Markdown)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from loraflow.errors import LoraflowError
from loraflow.gates import GateVerdict
from loraflow.layout import atomic_write_json, atomic_write_text
from loraflow.promotion import PromotionDecision


class RunResult(BaseModel):
    """Everything a caller (a person, a parent flow, an automation) needs about one run."""

    name: str
    status: str  # "passed" | "failed_gates"
    task: str
    model: str  # as the user named it: hub id, folder or `minilm`
    model_path: str
    passed: bool
    metrics: dict[str, Any]
    baseline: dict[str, Any]
    gates: dict[str, GateVerdict]
    adapter_path: str
    registry_version: int | None
    registry_path: str | None
    timings: dict[str, float]
    cached: dict[str, bool]
    cached_stages: list[str] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    paths: dict[str, str] = Field(default_factory=dict)
    flow_run_id: str | None = None
    promotion: PromotionDecision | None = None  # None: not registered
    data_warnings: list[str] = Field(default_factory=list)  # the prepared data's: what may train or score badly
    classes_missing: dict[str, list[str]] = Field(default_factory=dict)  # "test"/"validation": classes with no rows

    @property
    def failed_gates(self) -> list[GateVerdict]:
        """The failed critical gates: what failed the run (failed warning gates are only reported)."""
        return failed_critical(self.gates.values())


def failed_critical(gates: Iterable[GateVerdict]) -> list[GateVerdict]:
    return [gate for gate in gates if not gate.passed and gate.severity == "critical"]


def write_result(result: BaseModel, path: str | Path) -> Path:
    """`result.json`, `batch_result.json`, `variations_result.json`: written atomically."""
    return atomic_write_json(path, result.model_dump())


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def gate_line(gate: GateVerdict) -> str:
    comparison = ">=" if gate.higher_is_better else "<="
    return f"{gate.metric} {_fmt(gate.value)} {comparison} {gate.threshold} {gate_verdict(gate)}"


def verdict_word(gate: GateVerdict) -> str:
    """`pass`, `FAIL` (a failed critical gate: it fails the run) or `WARN` (a failed warning gate)."""
    return "pass" if gate.passed else ("FAIL" if gate.severity == "critical" else "WARN")


def gate_verdict(gate: GateVerdict, strong: str = "") -> str:
    """`pass`, `FAIL` or `WARN` (a failed warning gate), with the severity and profile where they are
    not the inline critical default: `WARN (warning, profile staging)`. `strong` wraps a FAIL (`**`)."""
    word = verdict_word(gate)
    verdict = f"{strong}{word}{strong}" if word == "FAIL" else word
    notes = [gate.severity] if gate.severity != "critical" else []
    notes += [f"profile {gate.profile}"] if gate.profile else []
    return f"{verdict} ({', '.join(notes)})" if notes else verdict


def promotion_line(decision: PromotionDecision, version: int | None) -> str:
    moved = f"-> v{version}" if decision.promote else "not moved"
    return f"{decision.alias} {moved} (promote_if: {decision.rule}): {decision.reason}"


def failure_message(result: RunResult) -> str:
    return f"{result.name}: quality gates failed: " + "; ".join(gate_line(g) for g in result.failed_gates)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "num_examples"}


def summary_text(result: RunResult) -> str:
    lines = [f"loraflow {result.name} ({result.task}, {result.model}): {result.status.upper()}"]
    for metric, value in scalar_metrics(result.metrics).items():
        lines.append(f"  {metric:<12} {_fmt(value):>10}   baseline {_fmt(result.baseline.get(metric))}")
    lines += [f"  gate: {gate_line(g)}" for g in result.gates.values()] or ["  gates: none set"]
    lines += [f"  warning: {warning}" for warning in result.data_warnings]
    if result.counts.get("rejected"):  # dropped rows are easy to miss in a run that passed
        lines.append(f"  rejected: {result.counts['rejected']} row(s) left out, reasons in {result.paths.get('rejects')}")
    cached = f" (cached: {', '.join(result.cached_stages)})" if result.cached_stages else ""
    lines.append(f"  time: {sum(result.timings.values()):.1f}s{cached}")
    lines.append(f"  adapter:  {result.adapter_path}")
    if result.registry_version is not None:
        lines.append(f"  registry: {result.name} v{result.registry_version}")
    if result.promotion is not None:
        lines.append(f"  promotion: {promotion_line(result.promotion, result.registry_version)}")
    lines.append(f"  result:   {result.paths.get('result', '')}")
    if result.paths.get("report"):
        lines.append(f"  report:   {result.paths['report']}")
    return "\n".join(lines)


def summary_markdown(result: RunResult) -> str:
    rows = [
        f"| {metric} | {_fmt(value)} | {_fmt(result.baseline.get(metric))} |"
        for metric, value in scalar_metrics(result.metrics).items()
    ]
    gates = [f"| {g.metric} | {'>=' if g.higher_is_better else '<='} {g.threshold} | {_fmt(g.value)} | "
             f"{gate_verdict(g, strong='**')} |" for g in result.gates.values()]
    timings = [f"| {stage} | {seconds:.1f} | {'yes' if result.cached.get(stage) else 'no'} |"
               for stage, seconds in result.timings.items()]
    return "\n".join([
        f"# {result.name}: {result.status}",
        "",
        *(["Data warnings:", "", *(f"- {warning}" for warning in result.data_warnings), ""]
          if result.data_warnings else []),
        "| metric | adapter | baseline |", "|---|---|---|", *rows,
        "",
        "| gate | threshold | value | verdict |", "|---|---|---|---|", *(gates or ["| (none) | | | |"]),
        "",
        "| stage | seconds | cached |", "|---|---|---|", *timings,
        "",
        f"Adapter: `{result.adapter_path}`  ",
        f"Registry version: {result.registry_version}  ",
        *(["", f"Promotion: {promotion_line(result.promotion, result.registry_version)}", "",
           result.promotion.table(), ""] if result.promotion else []),
        f"Result file: `{result.paths.get('result', '')}`",
        *report_links(result.paths),
    ])


# What `tasks.tracking.report_run` adds to a result's paths, as the summary names them.
REPORT_PATHS = {"report": "Report", "loss_curve": "Loss curve", "confusion_matrix": "Confusion matrix",
                "mlflow_run": "MLflow run"}


def report_links(paths: dict[str, str]) -> list[str]:
    """Markdown lines linking the report, the pictures and the MLflow run, where the run has them."""
    lines = []
    for key, label in REPORT_PATHS.items():
        target = paths.get(key)
        if target and target.startswith(("http://", "https://")):
            lines.append(f"{label}: [{target}]({target})  ")
        elif target and Path(target).is_file():
            lines.append(f"{label}: [{target}]({Path(target).resolve().as_uri()})  ")
        elif target:
            lines.append(f"{label}: `{target}`  ")
    return ["", *lines] if lines else []


class RunOutcome(BaseModel):
    """One run of a batch or a variations grid as the aggregate result and its table show it."""

    name: str
    status: Literal["passed", "failed_gates", "error", "skipped"]
    dataset: str | None = None  # batch: the data path
    values: dict[str, Any] = Field(default_factory=dict)  # variations: the varied settings
    metrics: dict[str, float] = Field(default_factory=dict)
    gates: dict[str, GateVerdict] = Field(default_factory=dict)
    seconds: float | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    cached_stages: list[str] = Field(default_factory=list)
    adapter_path: str | None = None
    merged_path: str | None = None  # `export: merged`: the merged model the run wrote
    registry_version: int | None = None
    result_path: str | None = None
    error: str | None = None

    @classmethod
    def of(
        cls, name: str, outcome: "RunResult | BaseException | None", shared_stages: tuple[str, ...] = (), **extra: Any
    ) -> "RunOutcome":
        """From what a run returned: its result, the exception it failed with, or None (never started).
        `seconds` leaves out `shared_stages`, work the run shared with its siblings."""
        if outcome is None:
            return cls(name=name, status="skipped", **extra)
        if isinstance(outcome, BaseException):
            return cls(name=name, status="error", error=error_line(outcome), **extra)
        return cls(
            name=name, status=outcome.status, metrics=scalar_metrics(outcome.metrics), gates=outcome.gates,
            seconds=round(sum(s for stage, s in outcome.timings.items() if stage not in shared_stages), 3),
            timings=outcome.timings, cached_stages=outcome.cached_stages, adapter_path=outcome.adapter_path,
            merged_path=outcome.paths.get("merged"), registry_version=outcome.registry_version,
            result_path=outcome.paths.get("result"), **extra,
        )

    @property
    def failed(self) -> bool:
        return self.status in ("failed_gates", "error")

    @property
    def reason(self) -> str:
        """Why it failed, in one line."""
        if self.status == "failed_gates":
            return "quality gates failed: " + "; ".join(gate_line(g) for g in failed_critical(self.gates.values()))
        return self.error or self.status


def error_line(error: BaseException) -> str:
    """A loraflow error is already the one line a user needs; anything else gets its type."""
    text = str(error).strip()
    return text if isinstance(error, LoraflowError) else f"{type(error).__name__}: {text}"


def outcome_line(outcome: RunOutcome, width: int = 0) -> str:
    """`name  status  metrics  varied values  time  registry version`, or the error; `width` aligns names."""
    head = f"{outcome.name:<{width}}  {outcome.status.upper():<12}"
    if outcome.status in ("error", "skipped"):
        return f"{head}  {outcome.reason if outcome.error else 'not started'}"
    parts = [head, *(f"{k} {_fmt(v)}" for k, v in outcome.metrics.items())]
    parts += [f"{key}={value}" for key, value in outcome.values.items()]
    parts.append(f"{outcome.seconds:.1f}s")
    if outcome.registry_version is not None:
        parts.append(f"registry v{outcome.registry_version}")
    return "  ".join(parts)


def outcome_table(outcomes: list[RunOutcome]) -> list[dict[str, Any]]:
    """Flat rows with the same columns: varied values, metrics, gate verdicts, time, paths, error."""
    columns = {
        part: list(dict.fromkeys(key for outcome in outcomes for key in getattr(outcome, part)))
        for part in ("values", "metrics", "gates")
    }
    rows = []
    for outcome in outcomes:
        row: dict[str, Any] = {"name": outcome.name, "status": outcome.status}
        row.update({key: outcome.values.get(key) for key in columns["values"]})
        row.update({key: outcome.metrics.get(key) for key in columns["metrics"]})
        for key in columns["gates"]:
            gate = outcome.gates.get(key)
            row[f"gate {key}"] = None if gate is None else gate_verdict(gate)
        row.update(seconds=outcome.seconds, adapter=outcome.adapter_path,
                   registry_version=outcome.registry_version, error=outcome.error)
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["name"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())
