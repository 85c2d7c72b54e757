"""Experiment trackers: TensorBoard and MLflow, besides loraflow's own files.

Step metrics (loss, learning rate, validation loss) reach the trackers through the transformers
Trainer's own integrations (`report_to`), inside the training process: the `TrackingRequest` in a
`TrainRequest` carries the plain settings they need (`loraflow.train.reporting` applies them in
rank 0, which alone reports). What the Trainer does not know is added here, from the flow's side,
after evaluation: the resolved config, the dataset's manifest and fingerprint, the base model's and
the adapter's test metrics, the gate verdicts, the registry version, the pictures, the report, and
the adapter itself.

MLflow: an experiment per dataset (a variations grid: per grid), a run per training run tagged with
the Prefect flow run id; a grid is one parent run with a child run per variant. With neither
`mlflow_tracking_uri` nor MLFLOW_TRACKING_URI, runs go to `<output_dir>/mlflow.db`. A tracking server
that cannot be reached fails the parameter check (`check_trackers`, one line); once training has
begun, trouble with a tracker is a warning and never fails a trained run.

mlflow and tensorboard (the `tracking` extra) are imported only inside the functions that use them:
a run that asks for no tracker never loads them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, Field

from loraflow.errors import ConfigError

TRACKERS = ("tensorboard", "mlflow")
INSTALL_HINT = "pip install -e '.[tracking]'"
PREFECT_FLOW_RUN_TAG = "prefect.flow_run_id"
HEALTH_TIMEOUT_S = 5.0
Log = Callable[[str], None]


class TrackingRequest(BaseModel):
    """What the training process needs to report step metrics: plain settings, since it runs apart."""

    report_to: list[str] = Field(default_factory=list, description="Trainer integrations: tensorboard, mlflow.")
    run_name: str
    tensorboard_dir: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str | None = None
    mlflow_run_id: str | None = None
    mlflow_run_url: str | None = None

    def environment(self) -> dict[str, str]:
        """The variables the Trainer's TensorBoard and MLflow callbacks read."""
        env = {"TENSORBOARD_LOGGING_DIR": self.tensorboard_dir} if self.tensorboard_dir else {}
        if "mlflow" in self.report_to and self.mlflow_run_id:
            env.update(MLFLOW_TRACKING_URI=self.mlflow_tracking_uri or "",
                       MLFLOW_EXPERIMENT_NAME=self.mlflow_experiment or "",
                       MLFLOW_RUN_ID=self.mlflow_run_id,
                       MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",  # a server gone down mid-training costs seconds, not minutes
                       MLFLOW_HTTP_REQUEST_TIMEOUT="20")
        return env


class TrackingParent(BaseModel):
    """A variations grid's tracking, which each variant's run joins: its experiment and parent run."""

    experiment: str
    mlflow_run_id: str | None = None
    mlflow_run_url: str | None = None


# The parameter check ---------------------------------------------------------------------------------


def mlflow_uri(configured: str | None, output_dir: str | Path) -> str:
    """`mlflow_tracking_uri`, else MLFLOW_TRACKING_URI, else a local store under the output root."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def _is_server(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def unreachable(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> str | None:
    """Why the MLflow tracking server at `uri` cannot be used now, or None (local stores always can)."""
    if not _is_server(uri):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError as error:
        return f"the MLflow tracking server at {uri} answered /health with HTTP {error.code}"
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        return f"cannot reach the MLflow tracking server at {uri} ({reason})"


def check_trackers(trackers: list[str], configured_uri: str | None, output_dir: str | Path) -> None:
    """Before any work: every tracker asked for is installed, and MLflow's server answers. One line each."""
    for tracker in trackers:
        if importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"tracking: {tracker} is not installed; {INSTALL_HINT}")
    if "mlflow" in trackers:
        problem = unreachable(mlflow_uri(configured_uri, output_dir))
        if problem:
            raise ConfigError(f"mlflow_tracking_uri: {problem}; start it, correct mlflow_tracking_uri "
                              "(or MLFLOW_TRACKING_URI), or take mlflow out of tracking")


# MLflow, from the flow's side ------------------------------------------------------------------------


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, uri: str, name: str, output_dir: str | Path) -> str:
    """The experiment called `name`, created when missing (a local store keeps its artifacts under the output root)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None if _is_server(uri) else (Path(output_dir).resolve() / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # a sibling run created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def run_address(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI (a server only: a local store has no address)."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if _is_server(uri) else None


def start_mlflow_run(uri: str, output_dir: str | Path, experiment: str, run_name: str, tags: dict[str, str],
                     parent_run_id: str | None = None) -> tuple[str, str | None]:
    """A new run in `experiment` (a child of `parent_run_id` when given): `(run id, web address)`."""
    client = _client(uri)
    experiment_id = _experiment_id(client, uri, experiment, output_dir)
    tags = {**tags, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    run = client.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    return run.info.run_id, run_address(uri, experiment_id, run.info.run_id)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"settings": {"lora": {"r": 8}}}` -> `{"settings.lora.r": 8}`."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class RunRecord(BaseModel):
    """What the flow adds to a tracker run after evaluation."""

    params: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict, description="Artifact folder -> local file or folder.")
    step: int = 0
    history: str | None = Field(default=None, description="metrics.jsonl: step metrics when the Trainer sent none.")


def log_mlflow_run(uri: str, run_id: str, record: RunRecord, finish: bool = True) -> None:
    """Params, final metrics, tags and artifacts into an existing run; then mark it finished, even
    when logging them raised (the training did finish: what is missing is the caller's warning)."""
    client = _client(uri)
    try:
        _log_record(client, run_id, record)
    finally:
        if finish:
            client.set_terminated(run_id, "FINISHED")


def _log_record(client, run_id: str, record: RunRecord) -> None:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    now = int(time.time() * 1000)
    params = [Param(key, value[:MAX_PARAM_VAL_LENGTH]) for key, value in record.params.items()]
    for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=params[start:start + MAX_PARAMS_TAGS_PER_BATCH])
    metrics = [Metric(key, value, now, record.step) for key, value in record.metrics.items()]
    if record.history and not client.get_metric_history(run_id, "loss"):  # a cached training sent none
        metrics += [Metric(key, value, now, step) for key, points in _history(record.history).items()
                    for step, value in points]
    for start in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[start:start + 500])
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in record.tags.items()])
    for folder, path in record.artifacts.items():
        if Path(path).is_dir():
            client.log_artifacts(run_id, path, folder)
        elif Path(path).is_file():
            client.log_artifact(run_id, path, folder)


def end_mlflow_run(uri: str, run_id: str, status: str) -> None:
    """End a run that will log nothing more: `FAILED` (training or evaluation raised) or `KILLED` (stopped)."""
    _client(uri).set_terminated(run_id, status)


def _history(metrics_jsonl: str) -> dict[str, list[tuple[int, float]]]:
    from loraflow.pictures import training_history

    return {key: points for key, points in training_history(metrics_jsonl).items() if key != "epoch"}


def safely(what: str, log: Log, call: Callable[[], Any]) -> Any:
    """Run a tracker call; on any failure log one warning and return None: a tracker never fails a trained run."""
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - every tracker failure is a warning by design
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log(f"{what} failed, the run goes on without it: {type(error).__name__}: {text[:300]}")
        return None


# TensorBoard, from the flow's side -------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk follows the 8-byte signature
    return width, height


def write_tensorboard(logdir: str | Path, step: int, scalars: dict[str, float], images: dict[str, str]) -> Path:
    """Final metrics as scalars and the pictures as images, in an event file of its own beside the
    Trainer's (written with tensorboard's own writer: no torch needed)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(logdir), filename_suffix=".loraflow")
    values = [Summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()]
    for tag, path in images.items():
        data = Path(path).read_bytes()
        width, height = _png_size(data)
        values.append(Summary.Value(tag=tag, image=Summary.Image(height=height, width=width, colorspace=4,
                                                                 encoded_image_string=data)))
    writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
    writer.close()
    return Path(writer.get_logdir())


# What a run and a grid send ------------------------------------------------------------------------


def _read_json(path: str | None) -> dict[str, Any]:
    if not path or not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text(encoding="utf-8"))


def final_metrics(result) -> dict[str, float]:
    """A `RunResult`'s numbers: `test_<metric>`, `baseline_<metric>`, `gate_<metric>_passed` (1 or 0)."""
    from loraflow.report import scalar_metrics

    metrics = {f"test_{k}": float(v) for k, v in scalar_metrics(result.metrics).items()}
    metrics.update({f"baseline_{k}": float(v) for k, v in scalar_metrics(result.baseline).items()})
    metrics.update({f"gate_{gate.metric}_passed": float(gate.passed) for gate in result.gates.values()})
    if result.registry_version is not None:
        metrics["registry_version"] = float(result.registry_version)
    return metrics


def run_record(result, resolved_config: dict[str, Any], pictures: dict[str, str], report: str | None) -> RunRecord:
    """A trained and evaluated run, as MLflow records it."""
    from loraflow.report import gate_verdict

    manifest = result.paths.get("manifest")
    params = {f"config.{key}": json.dumps(value) if isinstance(value, (list, dict)) else str(value)
              for key, value in flatten(resolved_config).items()}
    tags = {
        "loraflow.status": result.status,
        "loraflow.task": result.task,
        "loraflow.model": result.model,
        "loraflow.dataset_fingerprint": str(resolved_config.get("dataset_fingerprint", "")),
        "loraflow.config_fingerprint": str(resolved_config.get("fingerprint", "")),
        "loraflow.gates": "; ".join(f"{g.metric} {gate_verdict(g)}" for g in result.gates.values()) or "none set",
        "loraflow.adapter_path": result.adapter_path,
        "loraflow.result_path": result.paths.get("result", ""),
    }
    if result.registry_version is not None:
        tags.update({"loraflow.registry_version": str(result.registry_version),
                     "loraflow.registry_path": result.registry_path or ""})
    artifacts = {"adapter": result.adapter_path, "config": result.paths.get("config", ""), "data": manifest or "",
                 "eval": str(Path(result.paths.get("result", ".")).parent / "eval"), "report": report or ""}
    artifacts.update({f"pictures/{key}": path for key, path in pictures.items()})
    return RunRecord(params=params, metrics=final_metrics(result), tags=tags, artifacts=artifacts,
                     step=int(result.train.get("global_step") or 0),
                     history=str(Path(result.paths.get("result", ".")).parent / "logs" / "metrics.jsonl"))


def grid_record(result, pictures: dict[str, str], report: str | None) -> RunRecord:
    """A variations grid's parent run: the varied settings, the best variant's numbers, the leaderboard."""
    best = next((row for row in result.leaderboard if row.name == result.best), None)
    metrics = {f"best_{key}": float(value) for key, value in (best.metrics if best else {}).items()}
    metrics["variants"] = float(len(result.leaderboard))
    metrics["variants_passed"] = float(sum(row.status == "passed" for row in result.leaderboard))
    varied = sorted({key for row in result.leaderboard for key in row.values})
    tags = {"loraflow.metric": result.metric, "loraflow.best": result.best or "none",
            "loraflow.dataset": result.dataset}
    if result.registry_version is not None:
        tags.update({"loraflow.registry_name": result.registry_name or "",
                     "loraflow.registry_version": str(result.registry_version)})
    artifacts = {"leaderboard": result.paths.get("leaderboard", ""), "report": report or ""}
    artifacts.update({f"pictures/{key}": path for key, path in pictures.items()})
    return RunRecord(params={"grid.metric": result.metric, "grid.varied": ",".join(varied)}, metrics=metrics,
                     tags=tags, artifacts=artifacts)
