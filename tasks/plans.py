"""Execution plans: what a run would do and what it would find in the cache, without training.

A plan prepares the data with the (cached) preparation task, so row counts and step
estimates are exact, a malformed dataset is caught, and the run then reuses that work.
Everything after it is only looked up: for each stage the plan computes the cache key the
task would compute, from the arguments the run would pass it (`tasks.pipeline`), and asks
Prefect's result store whether a result is there and its files still exist. A stage after
one that would run is reported as running too: its inputs do not exist yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore

from loraflow.config import BatchParams, SingleParams, VariationsParams
from loraflow.data.prepare import PreparedDataset
from loraflow.data.tokenize import plan_shards
from loraflow.errors import LoraflowError
from loraflow.gates import check_gates
from loraflow.grid import Variant, rank_metric
from loraflow.plan import (
    CACHED,
    PREPARED_NOW,
    WILL_RUN,
    ExecutionPlan,
    PlannedDataset,
    PlannedRun,
    RunPlan,
    plan_run,
    resolve_config,
)
from loraflow.report import error_line
from loraflow.variations import BEST_ALIAS
from tasks.data import prepare_dataset_task, tokenize_shard_task
from tasks.evaluation import evaluate_task, samples_task
from tasks.pipeline import (
    expected_shards,
    result_storage,
    tokenize_stage_name,
    tokens_dir,
    train_request,
)
from tasks.registry import PROMOTED_ALIAS, register_task
from tasks.stages import StageRecorder, missing_outputs
from tasks.training import train_adapter_task


class CacheProbe:
    """Read-only questions to the result store a run's tasks cache into."""

    def __init__(self, storage: Path):
        self.store = ResultStore(result_storage=LocalFileSystem(basepath=str(storage)))

    def lookup(self, task: Task, /, **parameters: Any) -> Any | None:
        """The result `task` would be served from cache with these parameters; None if it would run."""
        key = task.cache_key_fn(None, parameters)
        if not self.store.exists(key):
            return None
        result = self.store.read(key).result
        return None if missing_outputs(result) else result


def _status(hit: Any) -> str:
    return WILL_RUN if hit is None else CACHED


def plan_data(plan: RunPlan, max_lengths: Iterable[int] = ()) -> tuple[PlannedDataset, PreparedDataset]:
    """Prepare (or reuse) the dataset, and what tokenisation and the baseline would do."""
    params, layout = plan.params, plan.layout
    stages = StageRecorder(result_storage(params))
    prepared = stages.run("prepare", prepare_dataset_task, params.dataset, params.task, layout.data)
    probe = CacheProbe(stages.result_storage)
    config = resolve_config(plan, prepared)
    status = {"prepare": CACHED if stages.cached["prepare"] else PREPARED_NOW}
    for length in sorted({config.settings.max_length, *max_lengths}):
        hits = [
            probe.lookup(tokenize_shard_task, shard=shard, tokenizer_path=plan.model_path, task=params.task,
                         max_length=length, out_dir=tokens_dir(plan))
            for shard in plan_shards(prepared, params.shard_size, plan.chat)
        ]
        status[tokenize_stage_name(plan, length)] = WILL_RUN if None in hits else CACHED
    test_shards = expected_shards(plan, prepared, config.settings.max_length)["test"]
    status["baseline"] = _status(probe.lookup(evaluate_task, config=config, test_shards=test_shards, adapter_dir=None,
                                              out_path=layout.eval / "baseline.json"))
    dataset = PlannedDataset(name=params.dataset.resolved_name, path=params.dataset.path, data_dir=str(layout.data),
                             counts=prepared.counts, stages=status)
    return dataset, prepared


def plan_training(
    plan: RunPlan, data_plan: RunPlan, prepared: PreparedDataset, registry_alias: str | None,
    values: dict[str, Any] | None = None,
) -> PlannedRun:
    """One training run: its resolved settings, optimiser steps, folder, and which stages are cached."""
    params, layout = plan.params, plan.layout
    probe = CacheProbe(result_storage(params))
    config = resolve_config(plan, prepared)
    shards = expected_shards(data_plan, prepared, config.settings.max_length)
    stages = {"train": WILL_RUN, "evaluate": WILL_RUN, "samples": WILL_RUN,
              "register": WILL_RUN if registry_alias else "best variant only"}
    trained = probe.lookup(train_adapter_task, config=config, request=train_request(plan, config, shards),
                           concurrency_limit=params.gpu_concurrency_limit)
    if trained is not None:
        stages["train"] = CACHED
        metrics = probe.lookup(evaluate_task, config=config, test_shards=shards["test"],
                               adapter_dir=trained.adapter_dir, out_path=layout.eval / "metrics.json")
        stages["evaluate"] = _status(metrics)
        stages["samples"] = _status(probe.lookup(
            samples_task, config=config, adapter_dir=trained.adapter_dir,
            prompts_path=prepared.sample_prompts_path, out_path=layout.samples / "predictions.jsonl"))
        if metrics is not None and registry_alias:
            passed = all(gate.passed for gate in check_gates(metrics, params.gates))
            stages["register"] = _status(probe.lookup(
                register_task, registry_root=params.registry_root, config=config, adapter_dir=trained.adapter_dir,
                metrics=metrics, passed=passed, alias=registry_alias, gates=params.gates))
    return PlannedRun(name=plan.name, dataset=prepared.name, output=plan.root, values=values or {},
                      settings=config.settings, steps=config.total_steps, stages=stages)


def plan_single(plan: RunPlan) -> ExecutionPlan:
    dataset, prepared = plan_data(plan)
    return ExecutionPlan(
        mode="single", name=plan.name, output_dir=str(Path(plan.params.output_dir).resolve()),
        registry=str(Path(plan.params.registry_root).resolve()), outputs={"result": str(plan.layout.result)},
        datasets=[dataset], runs=[plan_training(plan, plan, prepared, PROMOTED_ALIAS)],
    )


def plan_batch(params: BatchParams, runs: list[SingleParams], batch_folder: Path) -> ExecutionPlan:
    """Every dataset planned; one that fails its checks or preparation is listed with its error."""
    datasets, planned = [], []
    for run in runs:
        try:
            plan = plan_run(run)
            dataset, prepared = plan_data(plan)
            planned.append(plan_training(plan, plan, prepared, PROMOTED_ALIAS))
        except LoraflowError as error:
            dataset = PlannedDataset(name=run.dataset.resolved_name, path=run.dataset.path, error=error_line(error))
        datasets.append(dataset)
    return ExecutionPlan(
        mode="batch", name=params.name, output_dir=str(Path(params.output_dir).resolve()),
        registry=str(Path(params.registry_root).resolve()), outputs={"batch result": str(batch_folder / "batch_result.json")},
        datasets=datasets, runs=planned,
        notes=[f"strategy: {params.strategy}, {params.parallelism} dataset(s) at a time; "
               f"{'continue past' if params.continue_on_error else 'stop at the first'} failure"],
    )


def plan_variations(params: VariationsParams, base: RunPlan, variants: list[tuple[Variant, RunPlan]]) -> ExecutionPlan:
    """The shared preparation once, then every variant with its name, values, settings and cost."""
    dataset, prepared = plan_data(base, {plan.settings.max_length for _, plan in variants})
    metric = rank_metric(params)
    return ExecutionPlan(
        mode="variations", name=params.folder_name, output_dir=str(Path(params.output_dir).resolve()),
        registry=str(Path(params.registry_root).resolve()),
        outputs={"leaderboard": str(base.layout.root / "leaderboard.csv"),
                 "variations result": str(base.layout.root / "variations_result.json")},
        datasets=[dataset],
        runs=[plan_training(plan, base, prepared, None, variant.values) for variant, plan in variants],
        notes=[f"ranked by {metric}; the best variant that passes its gates is registered as "
               f"{params.dataset.resolved_name!r} with alias {BEST_ALIAS!r}"],
    )
