"""`single` and a 2-point `variations` grid with `tracking: [mlflow, tensorboard]` against a real
MLflow tracking server (SQLite backend, loopback port): runs, params, step metrics, final metrics and
the adapter artifact through MLflow's client; TensorBoard event files with the loss scalars; the
pictures and report.html of each run and of the grid; and a tracker in trouble never failing a run."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from loraflow.config import SingleParams
from loraflow.plan import RunPlan
from loraflow.tracking import PREFECT_FLOW_RUN_TAG, TrackingRequest
from loraflow.train.request import TrainRequest
from tests import browser
from tests.test_flow_single import FAST_CLASSIFICATION, classification_params
from tests.test_flow_variations import grid_params
from tests.test_tracking import closed_port, fake_run
from tests.test_train import tiny_llama  # noqa: F401  (a fixture)
from tests.test_training_process import two_cpu_slots  # noqa: F401  (a fixture)

pytest.importorskip("mlflow", reason="the tracking extra is not installed: pip install -e '.[tracking]'")
pytest.importorskip("tensorboard", reason="the tracking extra is not installed: pip install -e '.[tracking]'")

TRACKED = {"tracking": ["mlflow", "tensorboard"]}
SHORT = {**FAST_CLASSIFICATION, "num_epochs": 2, "logging_steps": 4}
SHORTER = {**FAST_CLASSIFICATION, "num_epochs": 1, "logging_steps": 2, "save_steps": 4}  # a grid's variants


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a loopback port with a SQLite backend, in a process group of its own."""

    def __init__(self, root: Path):
        self.uri = f"http://127.0.0.1:{free_port()}"
        port = self.uri.rsplit(":", 1)[1]
        self.log = open(root / "mlflow-server.log", "w")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
             f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", port, "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no background job workers
        )

    def wait(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2):
                    return self.uri
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server did not answer /health in {timeout:.0f}s; see {self.log.name}")

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))  # boots while the Prefect test server starts
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tracked(mlflow_server, prefect_server, tmp_path_factory):
    from flows.single import single
    from flows.variations import variations

    uri = mlflow_server.wait()
    one = classification_params(tmp_path_factory.mktemp("single"), overrides=SHORT, gates={"accuracy": 0.5},
                                mlflow_tracking_uri=uri, **TRACKED)
    grid = grid_params(tmp_path_factory.mktemp("grid"), grid={"learning_rate": [0.002, 0.01]}, overrides=SHORTER,
                       mlflow_tracking_uri=uri, **TRACKED)
    first = single(one, return_state=True).result()
    again = single(one, return_state=True).result()  # every stage cached: the Trainer reports nothing
    return uri, first, variations(grid, return_state=True).result(), again


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(uri: str, experiment: str):
    found = client(uri).get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client(uri).search_runs([found.experiment_id])


def artifact_names(uri: str, run_id: str, folder: str) -> set[str]:
    return {Path(entry.path).name for entry in client(uri).list_artifacts(run_id, folder)}


def assert_tracked_training(uri: str, run, result) -> None:
    """One training run as MLflow and TensorBoard hold it."""
    mlflow = client(uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags[PREFECT_FLOW_RUN_TAG] == result.flow_run_id
    params, settings = run.data.params, yaml.safe_load(Path(result.paths["config"]).read_text())["settings"]
    assert params["learning_rate"] == str(settings["learning_rate"])  # the Trainer's own params
    assert params["config.settings.lora.r"] == str(settings["lora"]["r"])  # and loraflow's resolved config
    assert params["config.dataset_fingerprint"] and run.data.tags["loraflow.dataset_fingerprint"]
    losses = mlflow.get_metric_history(run.info.run_id, "loss")
    assert len(losses) >= 3 and sorted(m.step for m in losses) == [m.step for m in sorted(losses, key=lambda m: m.step)]
    assert mlflow.get_metric_history(run.info.run_id, "eval_loss")
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert run.data.metrics["baseline_accuracy"] == pytest.approx(result.baseline["accuracy"])
    assert run.data.metrics["gate_accuracy_passed"] == float(result.gates["accuracy"].passed)
    assert "adapter_model.safetensors" in artifact_names(uri, run.info.run_id, "adapter")
    assert artifact_names(uri, run.info.run_id, "data") == {"manifest.json"}
    assert "loss.png" in artifact_names(uri, run.info.run_id, "pictures/loss_curve")
    assert "report.html" in artifact_names(uri, run.info.run_id, "report")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = Path(result.paths["result"]).parent / "logs" / "tensorboard"
    assert list(logs.glob("events.out.tfevents.*")), f"no TensorBoard event files in {logs}"
    events = EventAccumulator(str(logs)).Reload()
    assert len(events.Scalars("train/loss")) >= 3 and events.Scalars("eval/loss")
    assert events.Scalars("test/accuracy")[0].value == pytest.approx(result.metrics["accuracy"])


def test_a_single_run_is_one_mlflow_run_with_params_step_metrics_final_metrics_and_the_adapter(tracked):
    uri, result, _, _ = tracked
    [run] = [run for run in runs_of(uri, "reviews") if run.data.tags[PREFECT_FLOW_RUN_TAG] == result.flow_run_id]
    assert run.info.run_name == "reviews"
    assert_tracked_training(uri, run, result)
    assert run.data.tags["loraflow.registry_version"] == str(result.registry_version) == "1"
    assert result.paths["mlflow_run"] == f"{uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def test_a_cached_rerun_is_a_new_mlflow_run_whose_step_metrics_come_from_the_training_log(tracked):
    uri, first, _, again = tracked
    assert again.cached_stages and "train" in again.cached_stages
    runs = {run.data.tags[PREFECT_FLOW_RUN_TAG]: run for run in runs_of(uri, "reviews")}
    assert set(runs) == {first.flow_run_id, again.flow_run_id}
    rerun = runs[again.flow_run_id]
    steps = lambda run: [(m.step, m.value) for m in client(uri).get_metric_history(run.info.run_id, "loss")]  # noqa: E731
    assert sorted(steps(rerun)) == sorted(steps(runs[first.flow_run_id]))
    assert rerun.data.metrics["test_accuracy"] == pytest.approx(again.metrics["accuracy"])
    assert "adapter_model.safetensors" in artifact_names(uri, rerun.info.run_id, "adapter")


def test_a_single_run_links_its_mlflow_run_pictures_and_report_from_prefect(tracked):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    _, result, _, _ = tracked
    with get_client(sync_client=True) as prefect:
        this_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[result.flow_run_id]))
        artifacts = {a.key: a for a in prefect.read_artifacts(artifact_filter=this_run)}
    assert result.paths["mlflow_run"] in artifacts["reviews-mlflow"].data
    summary = artifacts["reviews-summary"].data
    for key in ("report", "loss_curve", "confusion_matrix"):
        assert Path(result.paths[key]).is_file() and result.paths[key] in summary
    root = Path(result.paths["result"]).parent
    assert result.paths["loss_curve"] == str(root / "logs" / "loss.png")
    assert result.paths["confusion_matrix"] == str(root / "eval" / "confusion_matrix.png")
    assert result.paths["report"] == str(root / "report.html")


def test_a_variations_grid_is_a_parent_mlflow_run_with_a_child_run_per_variant(tracked):
    uri, _, grid, _ = tracked
    runs = runs_of(uri, "reviews-variations")
    [parent] = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = {run.info.run_name: run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert parent.info.run_name == "reviews-variations" and len(runs) == 3
    assert set(children) == {outcome.name for outcome in grid.leaderboard}
    for outcome in grid.leaderboard:
        from loraflow.report import RunResult

        result = RunResult.model_validate_json(Path(outcome.result_path).read_text())
        assert_tracked_training(uri, children[outcome.name], result)
    assert parent.info.status == "FINISHED"
    best = next(o for o in grid.leaderboard if o.name == grid.best)
    assert parent.data.metrics["best_accuracy"] == pytest.approx(best.metrics["accuracy"])
    assert parent.data.tags["loraflow.best"] == grid.best
    assert {"leaderboard.csv"} <= artifact_names(uri, parent.info.run_id, "leaderboard")
    root = Path(grid.paths["variations_result"]).parent
    assert grid.paths["leaderboard_chart"] == str(root / "leaderboard.png")
    assert grid.paths["metric_by_setting"] == str(root / "metric_by_setting.png")
    assert "leaderboard.png" in artifact_names(uri, parent.info.run_id, "pictures/leaderboard_chart")

    # Prefect links the parent run and the grid's pictures and report (the server holds every test's: this grid's)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    address = f"{uri}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    assert grid.paths["mlflow_run"] == address
    grid_run = parent.data.tags[PREFECT_FLOW_RUN_TAG]
    with get_client(sync_client=True) as prefect:
        variant_run = prefect.read_flow_run(next(iter(children.values())).data.tags[PREFECT_FLOW_RUN_TAG])
        assert prefect.read_task_run(variant_run.parent_task_run_id).flow_run_id == UUID(grid_run)  # the grid's run
        this_grid = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[grid_run]))
        artifacts = {a.key: a for a in prefect.read_artifacts(artifact_filter=this_grid)}
    assert artifacts["reviews-variations-mlflow"].data == f"[MLflow run of reviews-variations]({address})"
    report = artifacts["reviews-variations-report"].data
    assert f"- mlflow_run: `{address}`" in report
    for key, file in (("leaderboard_chart", "leaderboard.png"), ("metric_by_setting", "metric_by_setting.png"),
                      ("report", "report.html")):
        assert f"- {key}: `{root / file}`" in report and (root / file).is_file()


def test_the_run_and_grid_reports_pass_the_browser_check(tracked):
    if browser.CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    _, result, grid, _ = tracked
    for report, images in ((result.paths["report"], 2), (grid.paths["report"], 2)):
        page = browser.check_page(report)
        assert page["errors"] == [], report
        assert len(page["facts"]["images"]) == images and all(i["width"] > 0 for i in page["facts"]["images"])


def test_a_tracking_server_gone_after_the_check_is_a_warning_and_the_run_goes_on(prefect_server, tmp_path, caplog,
                                                                                  monkeypatch):
    from prefect.logging import disable_run_logger

    import tasks.tracking
    from tasks.tracking import report_run, start_tracking_task

    logger = logging.getLogger("loraflow.test.tracking")  # what the tasks' run logger says, for caplog to read
    monkeypatch.setattr(tasks.tracking, "get_run_logger", lambda: logger)
    caplog.set_level(logging.WARNING, logger=logger.name)
    dead = f"http://127.0.0.1:{closed_port()}"
    params = SingleParams(dataset={"path": str(tmp_path / "d.csv")}, output_dir=str(tmp_path), mlflow_tracking_uri=dead,
                          **TRACKED)
    plan = RunPlan(params=params, name="reviews", model_path="/m", model_identity="m", root=str(tmp_path / "reviews"))
    request = TrainRequest(model_path="/m", task=params.task, settings=plan.settings, labels=None, train_shards=[],
                           eval_shards=[], checkpoint_dir="c", adapter_dir="a", logs_dir=str(tmp_path / "reviews" / "logs"))
    with disable_run_logger():
        started = start_tracking_task.fn(plan, request)
        assert started.tracking.report_to == ["tensorboard"] and started.tracking.mlflow_run_id is None
        result = fake_run(tmp_path / "reviews")
        gone = TrackingRequest(run_name="reviews", report_to=["mlflow"], mlflow_tracking_uri=dead, mlflow_run_id="0" * 32)
        reported = report_run.fn(request.model_copy(update={"tracking": gone}), result)
    assert Path(reported.paths["report"]).is_file() and Path(reported.paths["loss_curve"]).is_file()
    warnings = [(record.levelno, record.getMessage()) for record in caplog.records if record.name == logger.name]
    unreachable = f"MLflow: cannot reach the MLflow tracking server at {dead} ("
    assert [level for level, _ in warnings] == [logging.WARNING, logging.WARNING]
    (_, at_start), (_, at_report) = warnings
    assert at_start.startswith(unreachable) and at_start.endswith("; reviews goes on without MLflow")
    assert at_report.startswith(unreachable) and at_report.endswith("; the results stay in the run's folder only")
    assert all("\n" not in message for _, message in warnings)  # one line each


def test_in_a_two_process_training_only_rank_0_reports_to_the_trackers(mlflow_server, tmp_path, tiny_llama,
                                                                       two_cpu_slots):
    """The torchrun child path: the tracking settings travel in the job file, and one rank speaks."""
    from loraflow.devices import lease_devices
    from loraflow.tracking import start_mlflow_run
    from loraflow.train.launch import run_training
    from tests.test_train import request_for

    store = mlflow_server.wait()
    run_id, _ = start_mlflow_run(store, tmp_path, "ddp", "ddp-run", {PREFECT_FLOW_RUN_TAG: "none"})
    model_path, train = tiny_llama
    request = request_for(tmp_path / "ddp", model_path, "causal-lm", [train], batch_size=2, num_epochs=2)
    request.settings.logging_steps = 1
    tensorboard = tmp_path / "ddp" / "logs" / "tensorboard"
    request = request.model_copy(update={"tracking": TrackingRequest(
        run_name="ddp-run", report_to=["tensorboard", "mlflow"], tensorboard_dir=str(tensorboard),
        mlflow_tracking_uri=store, mlflow_experiment="ddp", mlflow_run_id=run_id)})
    with lease_devices(2, "tracked ddp") as lease:
        result = run_training(request, lease, log=lambda message: None)
    assert result.processes == 2
    assert len(list(tensorboard.glob("events.out.tfevents.*"))) == 1  # rank 0's only
    history = client(store).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, result.global_step + 1))  # each step once
