"""The training task: one LoRA run on leased devices, in its own torchrun process tree, with
live progress in the Prefect UI, that stops at a checkpoint when its flow run is cancelled.

It holds slots of the global concurrency limit (`orchestration/slots.py`: how many devices a pool may use)
and leases devices of this host (`loraflow.devices`: which ones; the child sees only those).
"""

from __future__ import annotations

import httpx
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from loraflow.errors import TrainingStopped
from loraflow.pipeline import train, train_key
from loraflow.plan import ResolvedConfig
from loraflow.train.launch import LaunchOptions
from loraflow.train.request import ProgressUpdate, TrainRequest, TrainResult
from orchestration.prefect_workarounds import (
    CancellationWatch,
    interrupted,
    note_on_cancelling_run,
    record_stopped_training,
    training_in_progress,
)
from orchestration.slots import training_slots
from tasks.policies import transient_retries


class TrainingProgress:
    """Forwards trainer progress to the run logs and to a progress artifact in the UI."""

    def __init__(self, name: str):
        self.logger = get_run_logger()
        self.artifact_id = create_progress_artifact(progress=0.0, description=f"Training LoRA adapter for {name}")

    def __call__(self, update: ProgressUpdate) -> None:
        if interrupted():  # stopping; the server may be gone, and each try would hold up the stop by seconds
            return
        percent = 100.0 * update.step / max(1, update.max_steps)
        try:
            update_progress_artifact(self.artifact_id, progress=min(100.0, percent))
        except (httpx.HTTPError, OSError):  # the UI's progress bar is not worth a training: the server may be gone
            pass


@task(name="train-lora", cache_key_fn=lambda context, parameters: train_key(parameters), **transient_retries())
def train_adapter_task(
    config: ResolvedConfig, request: TrainRequest, concurrency_limit: str, launch: LaunchOptions | None = None
) -> TrainResult:
    """Train the adapter in a torchrun process tree on leased devices of this host (one rank per
    device, `config.processes` in all), holding one slot of the global `concurrency_limit` per device.

    Cached on the resolved config's fingerprint (dataset, settings, base model, code), so an
    identical re-run reuses the adapter. A retry (a transient failure: the child was killed, ran
    out of memory at batch size 1, or hung) resumes from the last complete checkpoint instead of
    step 0; configuration errors are never retried.
    """
    launch = (launch or LaunchOptions()).with_rendezvous(run_id=flow_run.get_root_flow_run_id() or flow_run.get_id())
    logger = get_run_logger()
    watch = CancellationWatch()
    with training_slots(concurrency_limit, config.processes // launch.nnodes, run=flow_run.get_name() or config.name,
                        log=logger.info, should_stop=watch):
        try:
            with training_in_progress(request.checkpoint_dir):
                return train(config, request, launch, log=logger.info, on_progress=TrainingProgress(config.name),
                             should_stop=watch)
        except TrainingStopped as stopped:
            logger.warning(str(stopped))
            record_stopped_training(str(stopped))
            note_on_cancelling_run(watch.cancelled_run_id, str(stopped))
            raise
