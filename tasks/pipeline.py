"""Pieces of the pipeline shared by the flows and their plans.

A plan asks the cache whether each stage would be served from it, so it must compute the
very arguments the run passes each task: where results are stored, where shards land, and
the training request.
"""

from __future__ import annotations

from pathlib import Path

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from loraflow.config import RunSettings
from loraflow.data.prepare import PreparedDataset
from loraflow.data.tokenize import plan_shards, shard_file_name, shard_paths_by_split
from loraflow.layout import cache_dir
from loraflow.plan import ResolvedConfig, RunPlan
from loraflow.train.request import TrainRequest
from tasks.data import dask_task_runner, tokenize_dataset
from tasks.stages import StageRecorder


def result_storage(params: RunSettings) -> Path:
    """Prefect result storage, where the cache lives: shared by every run under one output root."""
    return cache_dir(params.output_dir)


def tokens_dir(plan: RunPlan) -> Path:
    return plan.layout.data / "tokens"


def tokenize_stage_name(plan: RunPlan, max_length: int) -> str:
    """`tokenize`, or `tokenize-<max_length>` for an extra length a variations grid asks for."""
    return "tokenize" if max_length == plan.settings.max_length else f"tokenize-{max_length}"


def tokenize_stage(stages: StageRecorder, plan: RunPlan, prepared: PreparedDataset, max_length: int) -> dict:
    """Tokenise every split at `max_length` (on Dask unless every shard is there); returns the
    shard paths per split."""
    params = plan.params
    with stages.timed(tokenize_stage_name(plan, max_length)) as stage:
        tokenize = tokenize_dataset.with_options(task_runner=shard_runner(plan, prepared, max_length))
        shards, stage.cached = tokenize(
            prepared, plan.model_path, params.task, max_length, params.shard_size, tokens_dir(plan),
            stages.result_storage, plan.chat,
        )
    return shards


def shard_runner(plan: RunPlan, prepared: PreparedDataset, max_length: int) -> TaskRunner:
    """Dask while shards remain to tokenise. When every shard file is already there (a re-run),
    each task only finds its file, and starting a cluster would cost more than all of them."""
    expected = expected_shards(plan, prepared, max_length)
    if all(Path(path).is_file() for paths in expected.values() for path in paths):
        return ThreadPoolTaskRunner(max_workers=4)
    return dask_task_runner(plan.params.dask_address, prepared)


def expected_shards(plan: RunPlan, prepared: PreparedDataset, max_length: int) -> dict[str, list[str]]:
    """The shard paths tokenisation will return, without tokenising (file names are content hashes)."""
    shards = plan_shards(prepared, plan.params.shard_size, plan.chat)
    names = [shard_file_name(shard, plan.model_path, plan.params.task, max_length) for shard in shards]
    return shard_paths_by_split([str(tokens_dir(plan) / name) for name in names])


def train_request(plan: RunPlan, config: ResolvedConfig, shards: dict[str, list[str]]) -> TrainRequest:
    layout = plan.layout
    return TrainRequest(
        model_path=plan.model_path, task=plan.params.task, settings=config.settings, labels=config.labels,
        train_shards=shards["train"], eval_shards=shards.get("validation", []),
        checkpoint_dir=str(layout.checkpoints), adapter_dir=str(layout.model), logs_dir=str(layout.logs),
        seed=plan.params.seed, processes=config.processes, chat_template=plan.chat.template if plan.chat else None,
        packing=plan.params.packing, quantization=plan.params.quantization,
    )
