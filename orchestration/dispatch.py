"""Where training runs: inline in this process, or as a flow run on the GPU work pool.

Local runs train inline (the training task holds a `gpu` slot here). When the pipeline
itself runs as a deployment (`auto`), or when asked (`deployment`), training becomes a
flow run of the training deployment (`flows/train.py`, pool `loraflow-gpu` by default)
started with `run_deployment` and per-run job variables (e.g. `CUDA_VISIBLE_DEVICES`).
The parent waits for it and reads its persisted result from storage both pools can read
(the `LoraflowStorage` block). Both paths run the same training task with the same cache
key and result storage, so an adapter trained one way is a cache hit the other way.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.deployments import run_deployment
from prefect.runtime import deployment
from pydantic import BaseModel

from blocks import LoraflowStorage, TrainingInfrastructure
from blocks.infrastructure import DEFAULT_BLOCK_NAME
from loraflow.config import SingleParams
from loraflow.errors import LoraflowError
from loraflow.plan import ResolvedConfig
from loraflow.train.launch import LaunchOptions
from loraflow.train.request import TrainRequest, TrainResult
from orchestration import events
from orchestration.stages import StageRecorder
from tasks.training import train_adapter_task

POLL_SECONDS = 2


class TrainJob(BaseModel):
    """The training flow's parameters: everything training needs, as paths and settings."""

    config: ResolvedConfig
    request: TrainRequest
    concurrency_limit: str
    launch: LaunchOptions = LaunchOptions()
    result_storage: str  # the pipeline's cache folder, shared by inline and dispatched training


class TrainOutcome(BaseModel):
    """What the training flow returns (persisted, read back by the pipeline)."""

    result: TrainResult
    cached: bool


class TrainingDispatchError(LoraflowError):
    """The training flow run did not complete; the message names it and its state."""


def should_dispatch(mode: Literal["auto", "inline", "deployment"]) -> bool:
    return mode == "deployment" or (mode == "auto" and deployment.get_id() is not None)


def launch_options(params: SingleParams) -> LaunchOptions:
    """How the training process tree is started; a multi-node rendezvous is read where training runs."""
    return LaunchOptions(nnodes=params.nnodes, hang_timeout_s=params.training_hang_timeout_s)


def train_stage(
    stages: StageRecorder, config: ResolvedConfig, request: TrainRequest, params: SingleParams
) -> TrainResult:
    """The pipeline's training stage: inline or dispatched, recorded in `stages` either way."""
    launch = launch_options(params)
    if should_dispatch(params.training_dispatch):
        with stages.timed("train") as stage:
            job = TrainJob(config=config, request=request, concurrency_limit=params.gpu_concurrency_limit,
                           launch=launch, result_storage=str(stages.result_storage))
            outcome = run_training_deployment(job, params.training_job_variables)
            stage.cached = outcome.cached
        trained = outcome.result
    else:
        trained = stages.run("train", train_adapter_task, config, request, params.gpu_concurrency_limit, launch)
    events.model_trained(config, trained)
    return trained


def storage_env() -> dict[str, str]:
    """Point the training run's persisted result at the shared storage block, when saved."""
    try:
        storage = LoraflowStorage.load(DEFAULT_BLOCK_NAME)
    except ValueError:  # no set-up: the default local result storage (one host) still works
        return {}
    return {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": storage.result_storage_slug()}


def run_training_deployment(job: TrainJob, job_variables: dict[str, Any]) -> TrainOutcome:
    """Start the training deployment as a subflow run, wait, and read its persisted result."""
    infrastructure = TrainingInfrastructure.load_or_default()
    child = run_deployment(
        infrastructure.deployment,
        parameters={"params": job.model_dump(mode="json")},
        job_variables=infrastructure.job_variables_for(job_variables, storage_env()),
        flow_run_name=f"train-{job.config.name}",
        poll_interval=POLL_SECONDS,
        timeout=None,
    )
    if child.state is not None and child.state.is_completed():
        return TrainOutcome.model_validate(child.state.result())
    state = f"{child.state.name}: {child.state.message}" if child.state else "without a state"
    raise TrainingDispatchError(f"training flow run {child.name!r} ({child.id}) ended {state}")
