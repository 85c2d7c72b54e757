"""train: one LoRA training run as its own flow, deployed on the GPU work pool.

The pipeline flows (`single`, `batch`, `variations`) start it with `run_deployment` when
they run as deployments (see `orchestration/dispatch.py`), so training happens on a GPU worker
while preparation and evaluation stay on the CPU pool. It runs the same training task as
inline training, with the same cache, and persists its result for the parent to read.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow

from blocks import use_hub_token
from blocks.infrastructure import worker_limit_name
from orchestration.dispatch import TrainJob, TrainOutcome
from orchestration.stages import StageRecorder
from tasks.training import train_adapter_task


def concurrency_limit_for_worker(limit: str) -> str:
    """A named GPU worker (`WORKER_ID=gpu-1 prefect worker start ...`) has its own slots."""
    worker = os.environ.get("WORKER_ID")
    return worker_limit_name(limit, worker) if worker else limit


@flow(name="train", persist_result=True, description="Train one LoRA adapter on a GPU worker (dispatched by the pipelines).")
def train(params: TrainJob) -> TrainOutcome:
    use_hub_token()
    stages = StageRecorder(Path(params.result_storage))
    limit = concurrency_limit_for_worker(params.concurrency_limit)
    result = stages.run("train", train_adapter_task, params.config, params.request, limit, params.launch)
    return TrainOutcome(result=result, cached=stages.cached["train"])
