"""The dry run (`--plan`, `plan_only`): what a run would do and what it would find in the cache,
without training.

A dry run walks the same stage lists as the run (`loraflow.pipeline`), with the same arguments:
it prepares the data with the (cached) preparation task, so row counts and step estimates are
exact and a malformed dataset is caught, and the run then reuses that work. Every other stage
is only looked up: its cache key, from the arguments the run would pass it, is asked of
Prefect's result store, and a hit counts only while its files still exist
(`tasks.stage_tasks.dry_run_stages`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from loraflow.config import BatchParams, SingleParams, VariationsParams
from loraflow.data.tokenize import templated_lengths
from loraflow.dry_run import DryRun, DryRunDataset, DryRunTraining, TemplatedTokens
from loraflow.errors import LoraflowError
from loraflow.grid import Variant, rank_metric
from loraflow.pipeline import DATA_STAGES, TRAINING_STAGES, PipelineRun
from loraflow.plan import RunPlan, optimiser_steps, plan_run
from loraflow.registry import BEST_ALIAS, PROMOTED_ALIAS
from loraflow.report import error_line
from orchestration.stages import StageRecorder, result_storage
from tasks.stage_tasks import dry_run_stages


class DryRunData(NamedTuple):
    dataset: DryRunDataset
    run: PipelineRun
    templated_lengths: list[int] | None  # task chat: each train conversation's tokens after templating


def dry_run_data(plan: RunPlan, max_lengths: Iterable[int] = ()) -> DryRunData:
    """Prepare (or reuse) the dataset, and what the other data stages would do."""
    run = PipelineRun(plan, max_lengths=max_lengths)
    status = dry_run_stages(DATA_STAGES, run, StageRecorder(result_storage(plan.params)))
    prepared = run["prepared"]
    dataset = DryRunDataset(name=plan.params.dataset.resolved_name, path=plan.params.dataset.path,
                             data_dir=str(plan.layout.data), counts=prepared.counts, stages=status)
    lengths = templated_lengths(prepared.splits["train"], plan.model_path, plan.chat) if plan.chat else None
    return DryRunData(dataset, run, lengths)


def dry_run_training(plan: RunPlan, data: DryRunData, registry_alias: str | None,
                  values: dict[str, Any] | None = None) -> DryRunTraining:
    """One training run: its resolved settings, optimiser steps (over packed rows when packing), folder,
    templated tokens (chat), and which stages are cached."""
    run = PipelineRun(plan, registry_alias=registry_alias, outputs=data.run.outputs)
    status = dry_run_stages(TRAINING_STAGES, run, StageRecorder(result_storage(plan.params)))
    config, templated = run.config, None
    steps = config.total_steps
    if data.templated_lengths is not None:
        templated = TemplatedTokens.count(data.templated_lengths, config.settings.max_length, plan.params.packing)
        if templated.packed_rows is not None:
            steps = optimiser_steps(templated.packed_rows, config.settings, config.processes)[1]
    return DryRunTraining(name=plan.name, dataset=run["prepared"].name, output=plan.root, values=values or {},
                      settings=config.settings, steps=steps, templated=templated, stages=status)


def dry_run_single(plan: RunPlan) -> DryRun:
    data = dry_run_data(plan)
    return DryRun(
        mode="single", name=plan.name, output_dir=str(Path(plan.params.output_dir).resolve()),
        registry=str(Path(plan.params.registry_root).resolve()), outputs={"result": str(plan.layout.result)},
        datasets=[data.dataset], runs=[dry_run_training(plan, data, PROMOTED_ALIAS)],
    )


def dry_run_batch(params: BatchParams, runs: list[SingleParams], batch_folder: Path) -> DryRun:
    """Every dataset planned; one that fails its checks or preparation is listed with its error."""
    datasets, planned = [], []
    for run in runs:
        try:
            plan = plan_run(run)
            data = dry_run_data(plan)
            dataset = data.dataset
            planned.append(dry_run_training(plan, data, PROMOTED_ALIAS))
        except LoraflowError as error:
            dataset = DryRunDataset(name=run.dataset.resolved_name, path=run.dataset.path, error=error_line(error))
        datasets.append(dataset)
    return DryRun(
        mode="batch", name=params.name, output_dir=str(Path(params.output_dir).resolve()),
        registry=str(Path(params.registry_root).resolve()), outputs={"batch result": str(batch_folder / "batch_result.json")},
        datasets=datasets, runs=planned,
        notes=[f"strategy: {params.strategy}, {params.parallelism} dataset(s) at a time; "
               f"{'continue past' if params.continue_on_error else 'stop at the first'} failure"],
    )


def dry_run_variations(params: VariationsParams, base: RunPlan, variants: list[tuple[Variant, RunPlan]]) -> DryRun:
    """The shared preparation once, then every variant with its name, values, settings and cost."""
    data = dry_run_data(base, {plan.settings.max_length for _, plan in variants})
    metric = rank_metric(params)
    return DryRun(
        mode="variations", name=params.folder_name, output_dir=str(Path(params.output_dir).resolve()),
        registry=str(Path(params.registry_root).resolve()),
        outputs={"leaderboard": str(base.layout.root / "leaderboard.csv"),
                 "variations result": str(base.layout.root / "variations_result.json")},
        datasets=[data.dataset],
        runs=[dry_run_training(plan, data, None, variant.values) for variant, plan in variants],
        notes=[f"ranked by {metric}; the best variant that passes its gates is registered as "
               f"{params.dataset.resolved_name!r} with alias {BEST_ALIAS!r}"],
    )
