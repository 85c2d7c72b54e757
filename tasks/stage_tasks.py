"""The core pipeline's stages (`loraflow.pipeline`) run as Prefect tasks, and planned without running.

Each stage runs as its task (retries, cache under the stage's own key, logs and events), or, for
the two stages that are more than one task, as its runner: tokenisation maps shards over Dask at
each length, and training may be dispatched to the GPU work pool. A stage with no task of its own
(one a test or a later feature adds) gets a plain task made from its core function.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from loraflow.dry_run import CACHED, PREPARED_NOW, WILL_RUN
from loraflow.model_process import warm_model_processes
from loraflow.pipeline import NotProducedYet, PipelineRun, Stage, expected_shards, tokenize_label
from orchestration.dispatch import train_stage
from orchestration.stages import StageRecorder, missing_outputs
from tasks.data import dask_task_runner, prepare_dataset_task, tokenize_dataset
from tasks.evaluation import evaluate_task, samples_task
from tasks.export import export_merged_task
from tasks.policies import transient_retries
from tasks.registry import register_task

STAGE_TASKS: dict[str, Task] = {
    "prepare": prepare_dataset_task,
    "baseline": evaluate_task,
    "evaluate": evaluate_task,
    "samples": samples_task,
    "register": register_task,
    "export": export_merged_task,
}
# Stages a plan runs for real: cheap, cached, and every later stage needs the facts they find (row counts, labels).
RUN_BY_DRY_RUNS = {"prepare"}


def _tokenize(stages: StageRecorder, run: PipelineRun, arguments: dict[str, Any]) -> dict[int, dict[str, list[str]]]:
    """Every split at every length, shards mapped over Dask (threads when every shard file is there).
    While Dask tokenises, the model processes start and import transformers for the baseline."""
    shards = {}
    for length in arguments["max_lengths"]:
        with stages.timed(tokenize_label(arguments["max_lengths"], length)) as stage:
            runner = shard_runner(arguments, length, run.params.dask_address)
            if not isinstance(runner, ThreadPoolTaskRunner):  # new shards: the baseline will run on them
                warm_model_processes(run.devices_at_once)
            tokenize = tokenize_dataset.with_options(task_runner=runner)
            shards[length], stage.cached = tokenize(
                arguments["prepared"], arguments["tokenizer_path"], arguments["task"], length,
                arguments["shard_size"], arguments["out_dir"], stages.result_storage, arguments["chat"],
            )
    return shards


def shard_runner(arguments: dict[str, Any], max_length: int, dask_address: str | None = None) -> TaskRunner:
    """Dask while shards remain to tokenise. When every shard file is already there (a re-run),
    each task only finds its file, and starting a cluster would cost more than all of them."""
    expected = expected_shards(arguments["prepared"], arguments["tokenizer_path"], arguments["task"], max_length,
                               arguments["shard_size"], arguments["out_dir"], arguments["chat"])
    if all(Path(path).is_file() for paths in expected.values() for path in paths):
        return ThreadPoolTaskRunner(max_workers=4)
    return dask_task_runner(dask_address, arguments["prepared"])


def _train(stages: StageRecorder, run: PipelineRun, arguments: dict[str, Any]) -> Any:
    return train_stage(stages, arguments["config"], arguments["request"], run.params)


STAGE_RUNNERS: dict[str, Callable[[StageRecorder, PipelineRun, dict[str, Any]], Any]] = {
    "tokenize": _tokenize,
    "train": _train,
}


@cache
def _plain_task(stage: Stage) -> Task:
    """A stage with no task of its own: its core function as a task, cached under its key."""
    return task(name=stage.name, cache_key_fn=lambda context, parameters: stage.cache_key(parameters),
                **transient_retries())(stage.function)


def stage_task(stage: Stage) -> Task:
    return STAGE_TASKS.get(stage.name) or _plain_task(stage)


def run_stages(stages: list[Stage], run: PipelineRun, recorder: StageRecorder) -> PipelineRun:
    """Run each stage that applies, in order, keeping its output in `run` and its timing in `recorder`."""
    for stage in stages:
        arguments = stage.arguments(run)
        if arguments is None:
            continue
        if runner := STAGE_RUNNERS.get(stage.name):
            run.outputs[stage.output] = runner(recorder, run, arguments)
        else:
            run.outputs[stage.output] = recorder.run(stage.name, stage_task(stage), **arguments)
    return run


class CacheProbe:
    """Read-only questions to the result store a run's tasks cache into."""

    def __init__(self, storage: Path):
        self.store = ResultStore(result_storage=LocalFileSystem(basepath=str(storage)))

    def lookup(self, key: str) -> Any | None:
        """The result cached under `key` whose files still exist; None if the stage would run."""
        if not self.store.exists(key):
            return None
        result = self.store.read(key).result
        return None if missing_outputs(result) else result


def dry_run_stages(stages: list[Stage], run: PipelineRun, recorder: StageRecorder) -> dict[str, str]:
    """What each stage would do: cached, will run, or run now (`RUN_BY_DRY_RUNS`). A cached stage's
    result, or a predicted one, lets later stages be looked up; after a stage that would run with
    no predictable output, the rest would run too."""
    probe, status = CacheProbe(recorder.result_storage), {}
    for stage in stages:
        try:
            arguments = stage.arguments(run)
        except NotProducedYet:
            status[stage.name] = WILL_RUN
            continue
        if arguments is None:
            if stage.skipped:
                status[stage.name] = stage.skipped
            continue
        if stage.name in RUN_BY_DRY_RUNS:
            run.outputs[stage.output] = recorder.run(stage.name, stage_task(stage), **arguments)
            status[stage.name] = CACHED if recorder.cached[stage.name] else PREPARED_NOW
            continue
        hits = {label: [probe.lookup(key) for key in keys] for label, keys in stage.keys_to_check(arguments).items()}
        status.update({label: WILL_RUN if None in found else CACHED for label, found in hits.items()})
        if stage.predict is not None:
            run.outputs[stage.output] = stage.predict(arguments)
        elif len(hits) == 1 and None not in (found := next(iter(hits.values()))) and len(found) == 1:
            run.outputs[stage.output] = found[0]
    return status
