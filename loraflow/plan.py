"""Turn parameters into a checked run plan, and a prepared dataset into the resolved config.

`plan_run` does every cheap check up front (preset, overrides, gates, dataset path,
model, LoRA targets, writable output) so a mistake fails in seconds with one clear line,
before data is read or a model is loaded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel

from loraflow.config import SingleParams, TrainingSettings, resolve_training_settings
from loraflow.errors import ConfigError, DataError
from loraflow.fingerprint import code_version, hash_json
from loraflow.gates import metrics_for_task
from loraflow.layout import RunLayout, atomic_write_text
from loraflow.models import check_target_modules, model_identity, resolve_model

if TYPE_CHECKING:
    from loraflow.data.prepare import PreparedDataset

class RunPlan(BaseModel):
    params: SingleParams
    name: str
    model_path: str
    model_identity: str
    settings: TrainingSettings
    root: str

    @property
    def layout(self) -> RunLayout:
        return RunLayout(Path(self.root))


class ResolvedConfig(BaseModel):
    """Preset + overrides + dataset facts: exactly what training runs with."""

    name: str
    task: str
    model: str
    model_identity: str
    preset: str
    settings: TrainingSettings
    labels: list[str] | None
    dataset_fingerprint: str
    train_rows: int
    steps_per_epoch: int
    total_steps: int
    seed: int
    code_version: str

    @property
    def fingerprint(self) -> str:
        return hash_json(self.model_dump())


def _check_writable(output_dir: str) -> None:
    path = Path(output_dir).resolve()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {output_dir!r} cannot be written ({existing} is not a writable folder)")


def plan_run(params: SingleParams) -> RunPlan:
    settings = resolve_training_settings(params.preset_name, params.overrides, params.task)
    unknown_gates = set(params.gates) - metrics_for_task(params.task)
    if unknown_gates:
        raise ConfigError(
            f"gates: {sorted(unknown_gates)} are not produced by task {params.task!r}; "
            f"use {sorted(metrics_for_task(params.task))}"
        )
    if not Path(params.dataset.path).exists():
        raise DataError(f"dataset.path: {params.dataset.path!r} does not exist")
    model_path = resolve_model(params.model)
    check_target_modules(settings.lora.target_modules, model_path, params.task)
    _check_writable(params.output_dir)
    name = params.dataset.resolved_name
    layout = RunLayout.create(params.output_dir, name)
    return RunPlan(
        params=params,
        name=name,
        model_path=model_path,
        model_identity=model_identity(model_path),
        settings=settings,
        root=str(layout.root),
    )


def resolve_config(plan: RunPlan, prepared: "PreparedDataset") -> ResolvedConfig:
    settings = plan.settings
    train_rows = prepared.counts["train"]
    steps_per_epoch = max(1, math.ceil(train_rows / (settings.batch_size * settings.gradient_accumulation_steps)))
    return ResolvedConfig(
        name=plan.name,
        task=plan.params.task,
        model=plan.model_path,
        model_identity=plan.model_identity,
        preset=plan.params.preset_name,
        settings=settings,
        labels=prepared.labels,
        dataset_fingerprint=prepared.fingerprint,
        train_rows=train_rows,
        steps_per_epoch=steps_per_epoch,
        total_steps=math.ceil(steps_per_epoch * settings.num_epochs),
        seed=plan.params.seed,
        code_version=code_version(),
    )


def write_resolved_config(config: ResolvedConfig, config_dir: str | Path) -> Path:
    """Readable YAML, written before training so a user can see exactly what will run."""
    document: dict[str, Any] = config.model_dump()
    document["fingerprint"] = config.fingerprint
    return atomic_write_text(Path(config_dir) / "resolved.yaml", yaml.safe_dump(document, sort_keys=False))
