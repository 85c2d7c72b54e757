"""Quality gates: the verdict of each threshold (which metrics each task reports: `loraflow.metrics`).

Kept free of torch so parameter validation can check gates in milliseconds.
"""

from __future__ import annotations

import math

from pydantic import BaseModel

from loraflow.metrics import HIGHER_IS_BETTER


class GateVerdict(BaseModel):
    metric: str
    threshold: float
    value: float | None
    higher_is_better: bool
    passed: bool


def check_gates(metrics: dict, gates: dict[str, float]) -> list[GateVerdict]:
    """One verdict per gate: `accuracy: 0.85` passes at >= 0.85, `perplexity: 40` at <= 40; missing fails."""
    verdicts = []
    for metric, threshold in gates.items():
        higher = HIGHER_IS_BETTER[metric]
        value = metrics.get(metric)
        value = float(value) if isinstance(value, (int, float)) else None
        passed = value is not None and not math.isnan(value) and (value >= threshold if higher else value <= threshold)
        verdicts.append(
            GateVerdict(metric=metric, threshold=threshold, value=value, higher_is_better=higher, passed=passed)
        )
    return verdicts
