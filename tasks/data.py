"""Prefect tasks for dataset preparation and sharded tokenisation (on Dask, see `dask_task_runner`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.task_runners import TaskRunner

from loraflow.chat import ChatEncoding
from loraflow.config import DatasetSpec
from loraflow.data.prepare import PreparedDataset, prepare_dataset
from loraflow.data.tokenize import Shard, shard_paths_by_split, split_into_shards, tokenize_shard
from loraflow.pipeline import prepare_key, report_rejects, tokenize_shard_key
from orchestration import events
from tasks.policies import transient_retries


@task(name="prepare-dataset", cache_key_fn=lambda context, parameters: prepare_key(parameters), **transient_retries())
def prepare_dataset_task(spec: DatasetSpec, task: str, data_dir: Path) -> PreparedDataset:
    """Read, validate, normalise, dedupe and split the dataset.

    Cached on the bytes of the input files plus the preparation settings: unchanged data
    is never re-read. I/O errors (a flaky network mount) are retried; a malformed dataset
    is not, since the same bytes fail the same way.
    """
    prepared = prepare_dataset(spec, task, data_dir)
    counts = ", ".join(f"{split} {count}" for split, count in prepared.counts.items())
    logger = get_run_logger()
    logger.info(f"prepared {prepared.name}: {counts}; rejects in {prepared.rejects_path}")
    for warning in prepared.warnings:
        logger.warning(warning)
    events.dataset_prepared(prepared)
    return prepared


@task(name="tokenize-shard", cache_key_fn=lambda context, parameters: tokenize_shard_key(parameters),
      **transient_retries())
def tokenize_shard_task(shard: Shard, tokenizer_path: str, task: str, max_length: int, out_dir: Path) -> str:
    """Tokenise one shard to parquet. One task per shard (thousands of rows), never per row:
    a Prefect task costs ~0.1 s on Dask, so shards must carry seconds of work each."""
    return tokenize_shard(shard, tokenizer_path, task, max_length, out_dir)


# Worker processes pay off only on big data: two spawned workers take ~7 s to import prefect,
# transformers and torch on 2 cores and ~2 s to stop, against 0.1 s to tokenise the demo; at 1M
# short rows (110 MB prepared) they were still no faster than threads (benchmarks/RESULTS.md).
PROCESS_CLUSTER_MIN_BYTES = 256 * 2**20


def dask_task_runner(address: str | None, prepared: PreparedDataset | None = None) -> TaskRunner:
    """An existing cluster when given; else a local one.

    With no Prefect server configured (`PREFECT_API_URL` unset), every Dask worker *process*
    would start its own temporary Prefect server on the same SQLite file, so the local
    cluster uses threads (fast tokenizers release the GIL). With a server, processes, once
    the `prepared` splits hold PROCESS_CLUSTER_MIN_BYTES (or their size is not given).
    """
    from prefect_dask import (
        DaskTaskRunner,  # imports distributed: not needed by a run served from the cache
    )

    # distributed sets its loggers to INFO when imported; its per-worker start-up lines would bury the run's logs.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if address:
        return DaskTaskRunner(address=address)
    # No dashboard: nobody watches it for a seconds-long job, and concurrent runs would fight over its port.
    local = {"dashboard_address": None}
    size = None if prepared is None else sum(os.path.getsize(path) for path in prepared.splits.values())
    if os.environ.get("PREFECT_API_URL") and (size is None or size >= PROCESS_CLUSTER_MIN_BYTES):
        # One tokenizer thread per worker: the workers already use every core, and each fast
        # tokenizer's own thread pool on top made them fight over it (benchmarks/RESULTS.md).
        tokenizer_threads = {"TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false")}
        workers = {"n_workers": 2, "threads_per_worker": 1, "processes": True, "env": tokenizer_threads}
        return DaskTaskRunner(cluster_kwargs={**local, **workers})
    return DaskTaskRunner(cluster_kwargs={**local, "n_workers": 1, "threads_per_worker": 2, "processes": False})


@flow(name="tokenize-dataset")
def tokenize_dataset(
    prepared: PreparedDataset,
    tokenizer_path: str,
    task: str,
    max_length: int,
    shard_size: int,
    out_dir: Path,
    result_storage: Path,
    chat: ChatEncoding | None = None,
) -> tuple[dict[str, list[str]], bool]:
    """Map shard tokenisation over the flow's task runner (Dask); returns parquet paths per split and
    whether every shard was served from cache."""
    shards = split_into_shards(prepared, shard_size, chat)
    get_run_logger().info(f"tokenising {sum(s.stop - s.start for s in shards)} rows in {len(shards)} shards")
    futures = tokenize_shard_task.with_options(result_storage=result_storage).map(
        shards, tokenizer_path=unmapped(tokenizer_path), task=unmapped(task), max_length=max_length, out_dir=out_dir
    )
    futures.wait()
    states = [future.state for future in futures]
    paths = [state.result() for state in states]
    report_rejects(prepared, paths, max_length, log=get_run_logger().warning)
    return shard_paths_by_split(paths), all(state.name == "Cached" for state in states)
