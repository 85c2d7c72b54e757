"""Turn parameters into a checked run plan, and a prepared dataset into the resolved config.

`plan_run` does every cheap check up front (preset, overrides, gates, dataset path,
model, LoRA targets, writable output) so a mistake fails in seconds with one clear line,
before data is read or a model is loaded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from loraflow.chat import ChatEncoding, resolve_chat_template
from loraflow.chat_eval import GenerationEval
from loraflow.config import SingleParams
from loraflow.data.prepare import PreparedDataset
from loraflow.data.readers import source_files
from loraflow.errors import ConfigError
from loraflow.fingerprint import code_version, hash_json
from loraflow.layout import RunLayout, atomic_write_text
from loraflow.metrics import metrics_for_task
from loraflow.models import check_target_modules, model_identity, resolve_model
from loraflow.quantization import check_quantization
from loraflow.settings import TrainingSettings, resolve_training_settings
from loraflow.task_table import TASK_TABLE
from loraflow.tracking import TrackingParent, check_trackers


class RunPlan(BaseModel):
    """One checked run: its parameters, name, base model and folder. Its training settings are
    resolved from the parameters (preset + overrides), never carried beside them, so a variant's
    plan is its parameters and nothing else can disagree with them."""

    params: SingleParams
    name: str
    model_path: str
    model_identity: str
    root: str
    tracking_parent: TrackingParent | None = None  # a variations grid's experiment and parent run
    chat: ChatEncoding | None = None  # task chat: the template and `train_on`, resolved in the checks

    @property
    def settings(self) -> TrainingSettings:
        return resolve_training_settings(self.params.preset_name, self.params.overrides, self.params.task)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(Path(self.root))

    def create_layout(self) -> RunLayout:
        """The run folder and its subfolders, made when training starts (a plan makes none)."""
        return RunLayout.create(Path(self.root).parent, Path(self.root).name)


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
    processes: int = 1  # devices x nodes: one DDP process each, each with its own batch_size rows per step
    steps_per_epoch: int
    total_steps: int
    seed: int
    code_version: str
    generation: GenerationEval | None = None  # task chat: how evaluation asks the held-out conversations

    @property
    def fingerprint(self) -> str:
        return hash_json(self.model_dump())


def _check_writable(output_dir: str) -> None:
    path = Path(output_dir).resolve()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output_dir: {output_dir!r} cannot be written ({existing} is not a writable folder); "
            "choose another output_dir or make it writable"
        )


def plan_run(params: SingleParams, root: str | Path | None = None) -> RunPlan:
    """Checks, then the plan of one run, named after its dataset, in `<output_dir>/<name>` unless
    `root` says otherwise (a variations grid keeps its shared data in its own folder)."""
    settings = resolve_training_settings(params.preset_name, params.overrides, params.task)
    unknown_gates = set(params.gate_set) - metrics_for_task(params.task)
    if unknown_gates:
        raise ConfigError(
            f"gates: {sorted(unknown_gates)} are not produced by task {params.task!r}; "
            f"use {sorted(metrics_for_task(params.task))}"
        )
    source_files(params.dataset.path, params.dataset.format)  # exists, and holds files of a known format
    model_path = resolve_model(params.model)
    check_target_modules(settings.lora.target_modules, model_path, params.task, remember=not params.plan_only)
    chat = None
    if TASK_TABLE[params.task].rows == "conversation":
        chat = ChatEncoding(template=resolve_chat_template(model_path, params.chat_template), train_on=params.train_on)
    check_quantization(params.quantization, dispatched=params.training_dispatch == "deployment")
    _check_writable(params.output_dir)
    check_trackers(params.tracking, params.mlflow_tracking_uri, params.output_dir)
    name = params.dataset.resolved_name
    root = Path(root or Path(params.output_dir) / name).resolve()
    return RunPlan(
        params=params,
        name=name,
        model_path=model_path,
        model_identity=model_identity(model_path),
        root=str(root),
        chat=chat,
    )


def resolve_config(plan: RunPlan, prepared: PreparedDataset) -> ResolvedConfig:
    settings = plan.settings
    train_rows = prepared.counts["train"]
    processes = plan.params.devices * plan.params.nnodes
    steps_per_epoch, total_steps = optimiser_steps(train_rows, settings, processes)
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
        processes=processes,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        seed=plan.params.seed,
        code_version=code_version(),
        generation=GenerationEval(conversations_path=prepared.splits["test"], template=plan.chat.template,
                                  max_new_tokens=settings.max_new_tokens, max_length=settings.max_length)
        if plan.chat else None,
    )


def optimiser_steps(rows: int, settings: TrainingSettings, processes: int) -> tuple[int, int]:
    """Steps per epoch and in all, for `rows` training rows (examples, or packed rows when packing)."""
    per_epoch = max(1, math.ceil(rows / (settings.batch_size * settings.gradient_accumulation_steps * processes)))
    return per_epoch, math.ceil(per_epoch * settings.num_epochs)


def write_resolved_config(config: ResolvedConfig, config_dir: str | Path) -> Path:
    """Readable YAML, written before training so a user can see exactly what will run."""
    document: dict[str, Any] = config.model_dump()
    document["fingerprint"] = config.fingerprint
    return atomic_write_text(Path(config_dir) / "resolved.yaml", yaml.safe_dump(document, sort_keys=False))


class PreparedData(BaseModel):
    """What every training run on one dataset shares: the prepared splits, their tokenised shards
    (per `max_length`), the bare base model's metrics, any further data stage's output (`extra`),
    and what producing them took."""

    prepared: PreparedDataset
    shards: dict[int, dict[str, list[str]]]
    baseline: dict[str, Any]
    baseline_path: str
    extra: dict[str, Any] = {}
    timings: dict[str, float]
    cached: dict[str, bool]

    def outputs(self) -> dict[str, Any]:
        """The data stages' outputs by name, to start a training run with."""
        return {"prepared": self.prepared, "shards": self.shards, "baseline": self.baseline, **self.extra}
