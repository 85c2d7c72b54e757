"""The training task: one LoRA run holding a GPU slot, with live progress in the Prefect UI."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from loraflow.plan import ResolvedConfig
from loraflow.train.trainer import ProgressUpdate, TrainRequest, TrainResult, train_adapter
from tasks.policies import RETRY_DELAYS, RETRY_JITTER, fingerprint_key, retry_transient_only


def ensure_concurrency_limit(name: str, slots: int = 1) -> None:
    """Create the global limit when missing. Prefect silently skips a missing limit unless
    `strict=True`, so loraflow creates it rather than run unthrottled; an existing limit
    keeps the slot count its owner gave it."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.upsert_global_concurrency_limit_by_name(name, slots)
            get_run_logger().info(f"created global concurrency limit {name!r} with {slots} slot(s)")


class TrainingProgress:
    """Forwards trainer progress to the run logs and to a progress artifact in the UI."""

    def __init__(self, name: str):
        self.logger = get_run_logger()
        self.artifact_id = create_progress_artifact(progress=0.0, description=f"Training LoRA adapter for {name}")

    def __call__(self, update: ProgressUpdate) -> None:
        percent = 100.0 * update.step / max(1, update.max_steps)
        update_progress_artifact(self.artifact_id, progress=min(100.0, percent))


def _train_key(context, parameters) -> str:
    config: ResolvedConfig = parameters["config"]
    request: TrainRequest = parameters["request"]
    return fingerprint_key("train", config.fingerprint, request.train_shards, request.eval_shards, request.adapter_dir)


@task(
    name="train-lora",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=retry_transient_only,
    cache_key_fn=_train_key,
)
def train_adapter_task(config: ResolvedConfig, request: TrainRequest, concurrency_limit: str) -> TrainResult:
    """Train the adapter while holding one slot of the global `concurrency_limit`.

    Cached on the resolved config's fingerprint (dataset, settings, base model, code), so an
    identical re-run reuses the adapter. A retry (transient failure) resumes from the last
    complete checkpoint instead of step 0; configuration errors are never retried.
    """
    logger = get_run_logger()
    ensure_concurrency_limit(concurrency_limit)
    with concurrency(concurrency_limit, occupy=1, strict=True):
        logger.info(f"holding a {concurrency_limit!r} slot; {config.total_steps} optimiser steps planned")
        return train_adapter(request, on_progress=TrainingProgress(config.name), log=logger.info)
