"""Trackers, pictures and the HTML report around a training run and a variations grid.

The Prefect side of `loraflow.tracking`, `loraflow.pictures` and `loraflow.html_report`: each flow
calls two of these, one before training (open the tracker runs, tell the training process where to
report) and one after its result is written (pictures, report.html, what the Trainer does not log).
None of them fails a run: a tracker in trouble is a warning. A run that asks for no tracker skips
the tracker steps without creating a task run, and never imports mlflow or tensorboard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from loraflow.config import RunSettings, VariationsParams
from loraflow.errors import TrainingStopped
from loraflow.grid import Variant
from loraflow.plan import RunPlan
from loraflow.report import RunResult, write_result
from loraflow.tracking import (
    PREFECT_FLOW_RUN_TAG,
    RunRecord,
    TrackingParent,
    TrackingRequest,
    end_mlflow_run,
    final_metrics,
    grid_record,
    log_mlflow_run,
    mlflow_uri,
    run_record,
    safely,
    start_mlflow_run,
    unreachable,
    write_tensorboard,
)
from loraflow.train.request import TrainRequest
from loraflow.variations import VariationsResult
from orchestration.reporting import artifact_key


def _prefect_tags() -> dict[str, str]:
    ui_url = flow_run.get_flow_run_ui_url()  # "None/flow-runs/..." without a UI (the temporary server)
    tags = {PREFECT_FLOW_RUN_TAG: flow_run.get_id(), "prefect.flow_run_name": flow_run.get_name(),
            "prefect.root_flow_run_id": flow_run.get_root_flow_run_id(),
            "prefect.flow_run_url": ui_url if str(ui_url).startswith("http") else None}
    return {key: str(value) for key, value in tags.items() if value}


def _open_mlflow_run(params: RunSettings, experiment: str, run_name: str, parent_run_id: str | None = None
                     ) -> tuple[str, str, str | None] | None:
    """`(tracking uri, run id, web address)` of a new MLflow run, or None (warned) when MLflow cannot take it."""
    logger = get_run_logger()
    uri = mlflow_uri(params.mlflow_tracking_uri, params.output_dir)
    problem = unreachable(uri)
    if problem:
        logger.warning(f"MLflow: {problem}; {run_name} goes on without MLflow")
        return None
    started = safely("starting the MLflow run", logger.warning, lambda: start_mlflow_run(
        uri, params.output_dir, experiment, run_name, _prefect_tags(), parent_run_id))
    if started is None:
        return None
    run_id, url = started
    logger.info(f"MLflow run {run_id} in experiment {experiment!r}: {url or uri}")
    if url:
        create_link_artifact(url, link_text=f"MLflow run of {run_name}", key=artifact_key(run_name, "mlflow"),
                             description=f"loraflow {run_name}: its MLflow run (experiment {experiment})")
    return uri, run_id, url


@contextmanager
def _mlflow_run_ended_if_failed(uri: str | None, run_id: str | None) -> Iterator[None]:
    """The MLflow run ends FAILED when what follows raises (KILLED when training was stopped on
    request), instead of staying RUNNING in MLflow for ever. Without a run, nothing to end."""
    try:
        yield
    except BaseException as error:
        if uri and run_id:
            status = "KILLED" if isinstance(error, TrainingStopped) else "FAILED"
            safely("ending the MLflow run", get_run_logger().warning, lambda: end_mlflow_run(uri, run_id, status))
        raise


def ended_if_failed(request: TrainRequest):
    """A training run's MLflow run, ended when its training, evaluation or reporting raises."""
    tracking = request.tracking
    return _mlflow_run_ended_if_failed(tracking and tracking.mlflow_tracking_uri, tracking and tracking.mlflow_run_id)


def grid_ended_if_failed(params: VariationsParams, variants: list[tuple[Variant, RunPlan]]):
    """A variations grid's parent MLflow run (from `start_grid_tracking`), ended when the grid raises
    before `report_grid` finishes it."""
    parent = variants[0][1].tracking_parent if variants else None
    run_id = parent.mlflow_run_id if parent else None
    return _mlflow_run_ended_if_failed(mlflow_uri(params.mlflow_tracking_uri, params.output_dir) if run_id else None,
                                       run_id)


def start_tracking(plan: RunPlan, request: TrainRequest) -> TrainRequest:
    """Before training: the request with where the Trainer reports step metrics (unchanged without trackers)."""
    return start_tracking_task(plan, request) if plan.params.tracking else request


@task(name="start-tracking", cache_policy=NO_CACHE)
def start_tracking_task(plan: RunPlan, request: TrainRequest) -> TrainRequest:
    params, parent = plan.params, plan.tracking_parent
    tensorboard = "tensorboard" in params.tracking
    tracking = TrackingRequest(run_name=plan.name, report_to=["tensorboard"] if tensorboard else [],
                               tensorboard_dir=str(plan.layout.logs / "tensorboard") if tensorboard else None)
    if "mlflow" in params.tracking:
        experiment = parent.experiment if parent else plan.name
        opened = _open_mlflow_run(params, experiment, plan.name, parent.mlflow_run_id if parent else None)
        if opened:
            uri, run_id, url = opened
            tracking = tracking.model_copy(update={
                "report_to": [*tracking.report_to, "mlflow"], "mlflow_tracking_uri": uri,
                "mlflow_experiment": experiment, "mlflow_run_id": run_id, "mlflow_run_url": url})
    return request.model_copy(update={"tracking": tracking})


def _tracker_links(tracking: TrackingRequest | TrackingParent | None) -> dict[str, str | None]:
    if tracking is None or not tracking.mlflow_run_id:
        return {}
    return {"MLflow run": tracking.mlflow_run_url or tracking.mlflow_run_id}


def _send_to_mlflow(uri: str, run_id: str, record: Callable[[], RunRecord]) -> None:
    logger = get_run_logger()
    problem = unreachable(uri)
    if problem:
        logger.warning(f"MLflow: {problem}; the results stay in the run's folder only")
        return
    safely("logging the results to MLflow", logger.warning, lambda: log_mlflow_run(uri, run_id, record()))


@task(name="report-run", cache_policy=NO_CACHE)
def report_run(request: TrainRequest, result: RunResult) -> RunResult:
    """After the result is written: the pictures, report.html, and, to the trackers, what the Trainer
    did not log. Returns the result with their paths (result.json is written again with them)."""
    from loraflow.html_report import write_run_report
    from loraflow.pictures import run_pictures

    logger = get_run_logger()
    root = Path(result.paths["result"]).parent
    pictures = safely("drawing the pictures", logger.warning,
                      lambda: run_pictures(root, result.name, result.paths.get("baseline"))) or {}
    tracking = request.tracking
    report = safely("writing report.html", logger.warning,
                    lambda: write_run_report(result, pictures, _tracker_links(tracking), root / "report.html"))
    paths = {**pictures, **({"report": str(report)} if report else {})}
    if tracking and tracking.tensorboard_dir:
        scalars = {key.replace("_", "/", 1): value for key, value in final_metrics(result).items()}
        safely("writing the TensorBoard summary", logger.warning, lambda: write_tensorboard(
            tracking.tensorboard_dir, int(result.train.get("global_step") or 0), scalars,
            {f"pictures/{key}": path for key, path in pictures.items()}))
    if tracking and tracking.mlflow_run_id:
        def record() -> RunRecord:
            resolved = yaml.safe_load(Path(result.paths["config"]).read_text(encoding="utf-8"))
            return run_record(result, resolved, pictures, str(report) if report else None)

        _send_to_mlflow(tracking.mlflow_tracking_uri, tracking.mlflow_run_id, record)
        paths["mlflow_run"] = tracking.mlflow_run_url or tracking.mlflow_run_id
    result = result.model_copy(update={"paths": {**result.paths, **paths}})
    write_result(result, result.paths["result"])
    return result


def start_grid_tracking(params: VariationsParams, variants: list[tuple[Variant, RunPlan]]
                        ) -> list[tuple[Variant, RunPlan]]:
    """Before the variants train: with MLflow, the grid's parent run, which each variant's run joins."""
    if "mlflow" not in params.tracking:
        return variants
    parent = start_grid_tracking_task(params)
    return [(variant, plan.model_copy(update={"tracking_parent": parent})) for variant, plan in variants]


@task(name="start-grid-tracking", cache_policy=NO_CACHE)
def start_grid_tracking_task(params: VariationsParams) -> TrackingParent:
    parent = TrackingParent(experiment=params.folder_name)
    opened = _open_mlflow_run(params, parent.experiment, params.folder_name)
    if opened:
        parent = parent.model_copy(update={"mlflow_run_id": opened[1], "mlflow_run_url": opened[2]})
    return parent


@task(name="report-grid", cache_policy=NO_CACHE)
def report_grid(params: VariationsParams, base: RunPlan, variants: list[tuple[Variant, RunPlan]],
                result: VariationsResult) -> VariationsResult:
    """After the leaderboard: the grid's pictures and report.html, and its MLflow parent run's results."""
    from loraflow.html_report import write_grid_report
    from loraflow.pictures import grid_pictures

    logger = get_run_logger()
    root, baseline_path = base.layout.root, base.layout.eval / "baseline.json"
    baseline = json.loads(baseline_path.read_text(encoding="utf-8")) if baseline_path.is_file() else {}
    rows = [outcome.model_dump(include={"name", "status", "values", "metrics"}) for outcome in result.leaderboard]
    pictures = safely("drawing the grid's pictures", logger.warning, lambda: grid_pictures(
        root, result.name, rows, result.metric, baseline.get(result.metric), params.gates.get(result.metric))) or {}
    parent = variants[0][1].tracking_parent if variants else None
    report = safely("writing the grid's report.html", logger.warning, lambda: write_grid_report(
        result, pictures, str(baseline_path), _tracker_links(parent), root / "report.html"))
    paths = {**pictures, **({"report": str(report)} if report else {})}
    if "tensorboard" in params.tracking and pictures:
        safely("writing the grid's TensorBoard summary", logger.warning, lambda: write_tensorboard(
            root / "logs" / "tensorboard", 0, {}, {f"grid/{key}": path for key, path in pictures.items()}))
    if parent and parent.mlflow_run_id:
        uri = mlflow_uri(params.mlflow_tracking_uri, params.output_dir)
        _send_to_mlflow(uri, parent.mlflow_run_id, lambda: grid_record(result, pictures, str(report) if report else None))
        paths["mlflow_run"] = parent.mlflow_run_url or parent.mlflow_run_id
    result = result.model_copy(update={"paths": {**result.paths, **paths}})
    write_result(result, result.paths["variations_result"])
    links = "\n".join(f"- {key}: `{path}`" for key, path in paths.items())
    create_markdown_artifact(markdown=f"# {result.name}: report and pictures\n\n{links}\n",
                             key=artifact_key(result.name, "report"),
                             description=f"loraflow variations {result.name}: report.html and pictures")
    return result
