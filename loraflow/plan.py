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
from loraflow.layout import RunLayout, atomic_write_text, cache_dir
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
    check_target_modules(
        settings.lora.target_modules, model_path, params.task, cache_dir(params.output_dir), remember=not params.plan_only
    )
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


# Execution plans: what a run would do, printed and returned by `plan_only` / `--plan`.
CACHED, WILL_RUN, PREPARED_NOW = "cached", "will run", "prepared for this plan"


class PlannedDataset(BaseModel):
    name: str
    path: str
    data_dir: str = ""
    counts: dict[str, int] = {}
    stages: dict[str, str] = {}  # prepare, tokenize, baseline -> CACHED / WILL_RUN / PREPARED_NOW
    error: str | None = None


class TemplatedTokens(BaseModel):
    """Task chat: the train split's conversations after templating, against one run's max_length."""

    conversations: int
    tokens: int  # in the conversations that fit max_length
    longest: int
    too_long: int  # left out whole by tokenisation
    packed_rows: int | None = None  # packing: the rows they fill, which training steps over

    @classmethod
    def count(cls, lengths: list[int], max_length: int, packing: bool) -> TemplatedTokens:
        from loraflow.train.packing import packed_rows

        kept = [length for length in lengths if length <= max_length]
        packed = None
        if packing and kept:
            dummy = [[0] * length for length in kept]  # best-fit packing looks at the lengths only
            packed = len(packed_rows({"input_ids": dummy, "labels": dummy}, max_length))
        return cls(conversations=len(lengths), tokens=sum(kept), longest=max(lengths, default=0),
                   too_long=len(lengths) - len(kept), packed_rows=packed)

    def line(self, max_length: int) -> str:
        packed = f"; packed into {self.packed_rows} rows" if self.packed_rows is not None else ""
        return (f"chat: {self.tokens:,} templated tokens in {self.conversations - self.too_long} train conversations "
                f"(longest {self.longest}; {self.too_long} over max_length {max_length} left out){packed}")


class PlannedRun(BaseModel):
    """One training run: its name, what it varies, its resolved settings, folder and cost."""

    name: str
    dataset: str
    output: str
    values: dict[str, Any] = {}
    settings: TrainingSettings | None = None
    steps: int | None = None  # optimiser steps, from the prepared train split (its packed rows when packing)
    templated: TemplatedTokens | None = None  # task chat
    stages: dict[str, str] = {}  # train, evaluate, samples, register -> CACHED / WILL_RUN


class ExecutionPlan(BaseModel):
    mode: str
    name: str
    output_dir: str
    registry: str
    outputs: dict[str, str]  # what the run writes besides the run folders (batch_result.json, leaderboard.csv)
    datasets: list[PlannedDataset]
    runs: list[PlannedRun]
    notes: list[str] = []

    @property
    def errors(self) -> list[PlannedDataset]:
        return [dataset for dataset in self.datasets if dataset.error]

    def text(self) -> str:
        """The plan as a person reads it: datasets, runs with their settings and cost, what is cached."""
        lines = [f"plan: {self.mode} {self.name!r}: {len(self.runs)} training run(s); a plan trains nothing"]
        for dataset in self.datasets:
            lines.append(f"dataset {dataset.name}: {dataset.path}")
            if dataset.error:
                lines.append(f"  ERROR: {dataset.error}")
                continue
            lines.append("  rows: " + ", ".join(f"{split} {count}" for split, count in dataset.counts.items()))
            lines.append(f"  data: {dataset.data_dir}  [{_stages(dataset.stages)}]")
        for run in self.runs:
            varied = " ".join(f"{key}={value}" for key, value in run.values.items())
            lines.append(f"run {run.name}" + (f"  ({varied})" if varied else ""))
            if run.settings is not None:
                lines.append(f"  {settings_line(run.settings)}; {run.steps} optimiser steps")
            if run.templated is not None and run.settings is not None:
                lines.append(f"  {run.templated.line(run.settings.max_length)}")
            lines.append(f"  -> {run.output}  [{_stages(run.stages)}]")
        lines += [f"{what}: {path}" for what, path in self.outputs.items()]
        return "\n".join([*lines, f"registry: {self.registry}", *self.notes])


def settings_line(settings: TrainingSettings) -> str:
    lora = settings.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ",".join(lora.target_modules)
    return (
        f"lr {settings.learning_rate:g}, epochs {settings.num_epochs:g}, batch {settings.batch_size}"
        f"x{settings.gradient_accumulation_steps}, max_length {settings.max_length}, "
        f"LoRA r {lora.r} alpha {lora.alpha:g} dropout {lora.dropout:g} on {targets}"
    )


def _stages(stages: dict[str, str]) -> str:
    return ", ".join(f"{stage} {status}" for stage, status in stages.items())

