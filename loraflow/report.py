"""The run's `result.json` and its human summaries (terminal text and Markdown)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from loraflow.gates import GateVerdict
from loraflow.layout import atomic_write_json


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

    @property
    def failed_gates(self) -> list[GateVerdict]:
        return [gate for gate in self.gates.values() if not gate.passed]


def write_result(result: RunResult, path: str | Path) -> Path:
    return atomic_write_json(path, result.model_dump())


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def gate_line(gate: GateVerdict) -> str:
    comparison = ">=" if gate.higher_is_better else "<="
    verdict = "pass" if gate.passed else "FAIL"
    return f"{gate.metric} {_fmt(gate.value)} {comparison} {gate.threshold} {verdict}"


def failure_message(result: RunResult) -> str:
    return f"{result.name}: quality gates failed: " + "; ".join(gate_line(g) for g in result.failed_gates)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "num_examples"}


def summary_text(result: RunResult) -> str:
    lines = [f"loraflow {result.name} ({result.task}, {result.model}): {result.status.upper()}"]
    for metric, value in scalar_metrics(result.metrics).items():
        lines.append(f"  {metric:<12} {_fmt(value):>10}   baseline {_fmt(result.baseline.get(metric))}")
    lines += [f"  gate: {gate_line(g)}" for g in result.gates.values()] or ["  gates: none set"]
    cached = f" (cached: {', '.join(result.cached_stages)})" if result.cached_stages else ""
    lines.append(f"  time: {sum(result.timings.values()):.1f}s{cached}")
    lines.append(f"  adapter:  {result.adapter_path}")
    if result.registry_version is not None:
        lines.append(f"  registry: {result.name} v{result.registry_version}")
    lines.append(f"  result:   {result.paths.get('result', '')}")
    return "\n".join(lines)


def summary_markdown(result: RunResult) -> str:
    rows = [
        f"| {metric} | {_fmt(value)} | {_fmt(result.baseline.get(metric))} |"
        for metric, value in scalar_metrics(result.metrics).items()
    ]
    gates = [f"| {g.metric} | {'>=' if g.higher_is_better else '<='} {g.threshold} | {_fmt(g.value)} | "
             f"{'pass' if g.passed else '**FAIL**'} |" for g in result.gates.values()]
    timings = [f"| {stage} | {seconds:.1f} | {'yes' if result.cached.get(stage) else 'no'} |"
               for stage, seconds in result.timings.items()]
    return "\n".join([
        f"# {result.name}: {result.status}",
        "",
        "| metric | adapter | baseline |", "|---|---|---|", *rows,
        "",
        "| gate | threshold | value | verdict |", "|---|---|---|---|", *(gates or ["| (none) | | | |"]),
        "",
        "| stage | seconds | cached |", "|---|---|---|", *timings,
        "",
        f"Adapter: `{result.adapter_path}`  ",
        f"Registry version: {result.registry_version}  ",
        f"Result file: `{result.paths.get('result', '')}`",
    ])
