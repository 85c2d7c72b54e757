"""The dry run (`--plan`, `plan_only`): what a run would do and what the cache already holds,
as data and as the text a person reads. Built by the flows' `orchestration/dry_run.py`; trains nothing."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from loraflow.settings import TrainingSettings

CACHED, WILL_RUN, PREPARED_NOW = "cached", "will run", "done now, to count rows"


class DryRunDataset(BaseModel):
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
        from loraflow.train.packing import packed_row_count

        kept = [length for length in lengths if length <= max_length]
        packed = packed_row_count(kept, max_length) if packing and kept else None
        return cls(conversations=len(lengths), tokens=sum(kept), longest=max(lengths, default=0),
                   too_long=len(lengths) - len(kept), packed_rows=packed)

    def line(self, max_length: int) -> str:
        packed = f"; packed into {self.packed_rows} rows" if self.packed_rows is not None else ""
        return (f"chat: {self.tokens:,} templated tokens in {self.conversations - self.too_long} train conversations "
                f"(longest {self.longest}; {self.too_long} over max_length {max_length} left out){packed}")


class DryRunTraining(BaseModel):
    """One training run: its name, what it varies, its resolved settings, folder and cost."""

    name: str
    dataset: str
    output: str
    values: dict[str, Any] = {}
    settings: TrainingSettings | None = None
    steps: int | None = None  # optimiser steps, from the prepared train split (its packed rows when packing)
    templated: TemplatedTokens | None = None  # task chat
    stages: dict[str, str] = {}  # train, evaluate, samples, register -> CACHED / WILL_RUN


class DryRun(BaseModel):
    mode: str
    name: str
    output_dir: str
    registry: str
    outputs: dict[str, str]  # what the run writes besides the run folders (batch_result.json, leaderboard.csv)
    datasets: list[DryRunDataset]
    runs: list[DryRunTraining]
    notes: list[str] = []

    @property
    def errors(self) -> list[DryRunDataset]:
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

