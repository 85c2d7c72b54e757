"""Quality gates: which metrics each task reports, and the verdict of each threshold.

Kept free of torch so parameter validation can check gates in milliseconds.
"""

from __future__ import annotations

import math

from pydantic import BaseModel

from loraflow.config import METRIC_HIGHER_IS_BETTER

TASK_METRICS: dict[str, frozenset[str]] = {
    "sequence-classification": frozenset({"accuracy", "f1_macro", "precision", "recall"}),
    "causal-lm": frozenset({"eval_loss", "perplexity"}),
}


class GateVerdict(BaseModel):
    metric: str
    threshold: float
    value: float | None
    higher_is_better: bool
    passed: bool


def metrics_for_task(task: str) -> set[str]:
    """The gate metrics evaluation reports for `task`: gates naming others can never pass."""
    return set(TASK_METRICS[task])


def check_gates(metrics: dict, gates: dict[str, float]) -> list[GateVerdict]:
    """One verdict per gate: `accuracy: 0.85` passes at >= 0.85, `perplexity: 40` at <= 40; missing fails."""
    verdicts = []
    for metric, threshold in gates.items():
        higher = METRIC_HIGHER_IS_BETTER[metric]
        value = metrics.get(metric)
        value = float(value) if isinstance(value, (int, float)) else None
        passed = value is not None and not math.isnan(value) and (value >= threshold if higher else value <= threshold)
        verdicts.append(
            GateVerdict(metric=metric, threshold=threshold, value=value, higher_is_better=higher, passed=passed)
        )
    return verdicts
