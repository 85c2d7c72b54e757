"""Quality gates: the verdict of each threshold (which metrics each task reports: `loraflow.metrics`),
and named gate profiles per environment read from a gates file.

A gate is `critical` (failing it fails the run and blocks promotion) or `warning` (reported, never
blocks). Inline `gates:` are critical. Kept free of torch so parameter validation can check gates in
milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from loraflow.errors import ConfigError
from loraflow.metrics import HIGHER_IS_BETTER
from loraflow.settings import StrictModel, suggest

Severity = Literal["critical", "warning"]
Approval = Literal["none", "required"]  # `required`: a promotion waits for a person's answer


class Gate(StrictModel):
    threshold: float
    severity: Severity = "critical"


class GateVerdict(BaseModel):
    metric: str
    threshold: float
    value: float | None
    higher_is_better: bool
    passed: bool
    severity: Severity = "critical"
    profile: str | None = None  # the gate profile it came from; None: an inline gate


def check_gates(metrics: dict, gates: Mapping[str, float | Gate], profile: str | None = None) -> list[GateVerdict]:
    """One verdict per gate: `accuracy: 0.85` passes at >= 0.85, `perplexity: 40` at <= 40; missing fails.
    A bare threshold is a critical gate; `profile` is recorded on the gates that are not bare."""
    verdicts = []
    for metric, gate in gates.items():
        own = gate if isinstance(gate, Gate) else Gate(threshold=gate)
        higher = HIGHER_IS_BETTER[metric]
        value = metrics.get(metric)
        value = float(value) if isinstance(value, (int, float)) else None
        passed = value is not None and not math.isnan(value) and (
            value >= own.threshold if higher else value <= own.threshold)
        verdicts.append(GateVerdict(metric=metric, threshold=own.threshold, value=value, higher_is_better=higher,
                                    passed=passed, severity=own.severity,
                                    profile=profile if isinstance(gate, Gate) else None))
    return verdicts


def gates_pass(verdicts: Iterable[GateVerdict]) -> bool:
    """A run passes when every critical gate passes; a failing warning gate is only reported."""
    return all(verdict.passed for verdict in verdicts if verdict.severity == "critical")


class GatesFile(StrictModel):
    """`profiles: {<name>: {<metric>: <threshold> | {threshold: ..., severity: critical|warning}, approval: ...}}`."""

    profiles: dict[str, dict[str, float | Gate | Approval]] = Field(min_length=1)


class GateProfile(BaseModel):
    """One environment's gates, and whether its promotions wait for a person's approval."""

    gates: dict[str, Gate]
    approval: Approval = "none"


def load_gate_profile(path: str | Path, profile: str) -> GateProfile:
    """The gates of `profile` in the gates file at `path`, each with its severity, and the profile's
    `approval` (a reserved key beside the metrics); one line on any error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"gates_file {path}: not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(error, 'problem', error)}") from None
    try:
        profiles = GatesFile.model_validate(raw).profiles
    except ValidationError as error:
        item = error.errors()[0]
        location = ".".join(str(part) for part in item["loc"][:3])
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        raise ConfigError(f"{path}: {location or 'top level'}: {message} (expected `profiles: {{name: {{metric: "
                          "threshold or {threshold, severity}}}}}`)") from None
    if profile not in profiles:
        raise ConfigError(f"{path}: no gate profile {profile!r}{suggest(profile, profiles)}")
    entries = dict(profiles[profile])
    approval = entries.pop("approval", "none")
    if not isinstance(approval, str):
        raise ConfigError(f"{path}: profiles.{profile}.approval: expected none or required")
    gates = {}
    for metric, gate in entries.items():
        if metric not in HIGHER_IS_BETTER:
            raise ConfigError(f"{path}: profiles.{profile}.{metric}: unknown gate metric{suggest(metric, HIGHER_IS_BETTER)}")
        if isinstance(gate, str):
            raise ConfigError(f"{path}: profiles.{profile}.{metric}: expected a threshold or {{threshold, severity}}")
        gates[metric] = gate if isinstance(gate, Gate) else Gate(threshold=gate)
    return GateProfile(gates=gates, approval=approval)
