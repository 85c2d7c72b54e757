"""Variations: one dataset trained under a grid of settings, ranked on a leaderboard.

The grid itself (expansion, names, checks) is `loraflow.grid`; here each variant becomes a run
plan in its own folder, and the outcomes become a leaderboard with a best pick.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from loraflow.config import SingleParams, VariationsParams
from loraflow.errors import ConfigError
from loraflow.grid import Variant, expand_variations
from loraflow.metrics import HIGHER_IS_BETTER
from loraflow.models import check_target_modules
from loraflow.plan import RunPlan, plan_run
from loraflow.registry import BEST_ALIAS
from loraflow.report import RunOutcome, outcome_line


def variant_root(root: str | Path, name: str) -> Path:
    """`<root>/<name>`, refusing a path that resolves outside `root` (a symlink planted there)."""
    root = Path(root).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise ConfigError(f"name_template: variant {name!r} resolves to {path}, outside {root}; remove that link")
    return path


def variant_plans(params: VariationsParams) -> tuple[RunPlan, list[tuple[Variant, RunPlan]]]:
    """The plan of the shared data (`<output_dir>/<name>`) and one plan per variant, in its own
    folder below it (its checkpoints and adapter are its own; the training cache key includes them).
    The shared plan has the first variant's parameters: the baseline is evaluated at its `max_length`."""
    root = Path(params.output_dir).resolve() / params.folder_name
    base = plan_run(params, root=root)
    shared = params.model_dump(include=set(SingleParams.model_fields))
    plans = []
    for variant in expand_variations(params):
        variant_params = SingleParams(**{**shared, "overrides": variant.overrides, **variant.run_settings})
        plan = base.model_copy(update={"params": variant_params, "name": variant.name,
                                       "root": str(variant_root(root, variant.name))})
        if plan.settings.lora.target_modules != base.settings.lora.target_modules:
            check_target_modules(plan.settings.lora.target_modules, base.model_path, params.task,
                                 remember=not params.plan_only)
        plans.append((variant, plan))
    return base.model_copy(update={"params": plans[0][1].params}), plans


def leaderboard(outcomes: list[RunOutcome], metric: str) -> list[RunOutcome]:
    """Best first by `metric` (its direction known); variants without the metric (errors) last."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0

    def key(outcome: RunOutcome) -> tuple[bool, float]:
        value = outcome.metrics.get(metric)
        usable = isinstance(value, (int, float)) and not math.isnan(value)
        return (not usable, -sign * value if usable else 0.0)

    return sorted(outcomes, key=key)


def best_variant(ranked: list[RunOutcome]) -> RunOutcome | None:
    """The highest-ranked variant whose gates all passed."""
    return next((outcome for outcome in ranked if outcome.status == "passed"), None)


class VariationsResult(BaseModel):
    """The variations run as a whole: the leaderboard (best first) and what was registered."""

    name: str
    dataset: str
    metric: str
    leaderboard: list[RunOutcome]
    best: str | None
    registry_name: str | None = None
    registry_version: int | None = None
    prepared: dict[str, Any]  # the shared preparation's timings and cache hits
    paths: dict[str, str]

    @property
    def failed(self) -> list[RunOutcome]:
        return [outcome for outcome in self.leaderboard if outcome.status == "error"]

    @property
    def ok(self) -> bool:
        """Something was registered as best and no variant broke."""
        return self.best is not None and not self.failed

    @property
    def message(self) -> str:
        if self.best is None:
            head = f"{self.name}: no variant passed its gates"
        else:
            head = (f"{self.name}: best {self.best} by {self.metric}, registered as "
                    f"{self.registry_name} v{self.registry_version} (alias {BEST_ALIAS!r})")
        failures = "; ".join(f"{outcome.name} ({outcome.reason})" for outcome in self.failed)
        return f"{head}; failed: {failures}" if failures else head

    def text(self) -> str:
        lines = [f"loraflow variations {self.name!r} on {self.dataset}: {len(self.leaderboard)} variants by {self.metric}"]
        width = max(len(outcome.name) for outcome in self.leaderboard)
        lines += [f"  {rank}. {outcome_line(outcome, width)}" for rank, outcome in enumerate(self.leaderboard, start=1)]
        return "\n".join([*lines, f"  {self.message}", *(f"  {what}: {path}" for what, path in self.paths.items())])
