"""Trackers, pictures and the HTML report, without Prefect and without training: the parameter check
on an unreachable server, the Trainer-side guard, PNGs drawn from known logs, the report in a real
headless browser, and the import cost of a run that asks for none of it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.config import SingleParams
from loraflow.errors import ConfigError
from loraflow.gates import Gate, check_gates
from loraflow.html_report import write_grid_report, write_run_report
from loraflow.layout import atomic_write_json, atomic_write_jsonl
from loraflow.pictures import (
    draw_confusion_matrices,
    draw_leaderboard_chart,
    draw_loss_curve,
    draw_metric_by_setting,
    grid_pictures,
    run_pictures,
    training_history,
)
from loraflow.report import RunOutcome, RunResult, summary_markdown
from loraflow.tracking import (
    TrackingRequest,
    check_trackers,
    mlflow_uri,
    run_record,
    unreachable,
    write_tensorboard,
)
from loraflow.train.reporting import _guard, report_to
from loraflow.variations import VariationsResult
from tests import browser

REPO = Path(__file__).resolve().parents[1]
LABELS = ["negative", "positive"]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_tracking_server_fails_the_parameter_check_in_one_line(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ConfigError) as error:
        check_trackers(["mlflow"], uri, tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.startswith("mlflow_tracking_uri: cannot reach the MLflow tracking server")
    assert uri in message
    check_trackers(["tensorboard"], uri, tmp_path)  # TensorBoard needs no server
    check_trackers(["mlflow"], "sqlite:///" + str(tmp_path / "m.db"), tmp_path)  # a local store is always there


def tracked_params(tmp_path: Path, **changes) -> SingleParams:
    """A run asking for MLflow; all-linear LoRA targets spare the plan building the model to check them."""
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello,a\nbye,b\n")
    return SingleParams(dataset={"path": str(data)}, output_dir=str(tmp_path / "out"), tracking=["mlflow"],
                        overrides={"lora.target_modules": "all-linear"}, **changes)


def test_the_plan_fails_in_one_line_on_an_unreachable_tracking_server_before_any_work(tmp_path):
    from loraflow.plan import plan_run

    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ConfigError) as error:
        plan_run(tracked_params(tmp_path, mlflow_tracking_uri=uri))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"mlflow_tracking_uri: cannot reach the MLflow tracking "
                                                       f"server at {uri}")


def test_the_plan_says_how_to_install_a_tracker_that_is_missing(tmp_path, monkeypatch):
    import importlib.util

    from loraflow.plan import plan_run

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "mlflow" else
                        find_spec(name, *args))
    with pytest.raises(ConfigError) as error:
        plan_run(tracked_params(tmp_path))
    assert str(error.value) == "tracking: mlflow is not installed; pip install -e '.[tracking]'"  # as the README says
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "pip install -e '.[tracking]'" in readme


def test_mlflow_uri_is_the_parameter_then_the_environment_then_a_store_under_the_output(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert mlflow_uri(None, tmp_path) == "http://tracking:5000"
    assert mlflow_uri("http://mine:5000", tmp_path) == "http://mine:5000"
    assert unreachable("sqlite:///x.db") is None


def test_tracking_is_a_validated_list_that_defaults_to_none(tmp_path):
    params = SingleParams(dataset={"path": str(tmp_path / "d.csv")})
    assert params.tracking == [] and params.mlflow_tracking_uri is None
    assert SingleParams(dataset={"path": "d.csv"}, tracking=["mlflow", "tensorboard"]).tracking == ["mlflow", "tensorboard"]
    with pytest.raises(ValueError, match="tracking"):
        SingleParams(dataset={"path": "d.csv"}, tracking=["wandb"])


def test_the_trainer_reports_to_nothing_unless_asked():
    assert report_to(None) == "none"
    assert report_to(TrackingRequest(run_name="r")) == "none"
    assert report_to(TrackingRequest(run_name="r", report_to=["tensorboard", "mlflow"])) == ["tensorboard", "mlflow"]


def test_a_failing_tracker_callback_becomes_one_warning_and_then_stays_silent(monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)

    class Tracker:
        calls: list = []

        def on_log(self, args, state, control, **kwargs):
            import os

            self.calls.append(os.environ.get("MLFLOW_RUN_ID"))
            raise ConnectionError("server went away")

    callback, said = Tracker(), []
    _guard(callback, {"MLFLOW_RUN_ID": "abc"}, said.append)
    assert callback.on_log(None, None, None) is None
    assert callback.on_log(None, None, None) is None
    assert Tracker.calls == ["abc"]  # the environment is there during the call, the second call is skipped
    import os

    assert "MLFLOW_RUN_ID" not in os.environ  # and gone after it
    assert len(said) == 1 and said[0].startswith("warning: reporting to Tracker failed, the run goes on without it")


def fake_run(root: Path) -> RunResult:
    """A classification run's files as the pipeline leaves them, with known numbers."""
    records = []
    for step in range(1, 41):
        records.append({"loss": 0.7 * 0.95 ** step, "learning_rate": 1e-3 * (1 - step / 40), "epoch": step / 10,
                        "step": step})
        if step % 10 == 0:
            records.append({"eval_loss": 0.6 * 0.9 ** step, "epoch": step / 10, "step": step})
    records.append({"loss": 9.9, "step": 20, "epoch": 2.0})  # a resume logs step 20 again: the later wins
    records.append({"train_runtime": 3.0, "train_loss": 0.3, "step": 40, "epoch": 4.0})
    atomic_write_jsonl(root / "logs" / "metrics.jsonl", records)
    adapter = {"accuracy": 0.9, "f1_macro": 0.89, "confusion_matrix": [[9, 1], [1, 9]], "labels": LABELS,
               "num_examples": 20}
    baseline = {"accuracy": 0.5, "f1_macro": 0.33, "confusion_matrix": [[10, 0], [10, 0]], "labels": LABELS,
                "num_examples": 20}
    atomic_write_json(root / "eval" / "metrics.json", adapter)
    atomic_write_json(root / "eval" / "baseline.json", baseline)
    atomic_write_jsonl(root / "samples" / "predictions.jsonl",
                       [{"text": "a <b>great</b> film & more", "label": "positive", "predicted": "positive"},
                        {"text": "dull", "label": "negative", "predicted": "positive"}])
    gates = {v.metric: v for v in check_gates(adapter, {"accuracy": 0.8})}
    return RunResult(
        name="reviews", status="passed", task="sequence-classification", model="minilm", model_path="/m",
        passed=True, metrics=adapter, baseline=baseline, gates=gates, adapter_path=str(root / "model"),
        registry_version=1, registry_path="/r", timings={"train": 3.0, "evaluate": 0.5}, cached={"train": False},
        counts={"train": 60, "test": 20}, train={"global_step": 40, "epochs": 4.0, "device": "cpu"},
        paths={"result": str(root / "result.json"), "samples": str(root / "samples" / "predictions.jsonl")},
    )


def png_size(path: str) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_a_run_gets_its_loss_curve_and_confusion_matrices_next_to_their_data(tmp_path):
    result = fake_run(tmp_path)
    history = training_history(tmp_path / "logs" / "metrics.jsonl")
    assert len(history["loss"]) == 40 and dict(history["loss"])[20] == 9.9
    assert [step for step, _ in history["eval_loss"]] == [10, 20, 30, 40]
    pictures = run_pictures(tmp_path, result.name)
    assert pictures == {"loss_curve": str(tmp_path / "logs" / "loss.png"),
                        "confusion_matrix": str(tmp_path / "eval" / "confusion_matrix.png")}
    for path in pictures.values():
        width, height = png_size(path)
        assert width >= 600 and height >= 350


def test_pictures_whose_inputs_did_not_change_are_kept_without_loading_matplotlib(tmp_path):
    result = fake_run(tmp_path)
    first = run_pictures(tmp_path, result.name)
    drawn = {key: Path(path).stat().st_mtime_ns for key, path in first.items()}
    code = ("import sys; from loraflow.pictures import run_pictures; "
            f"print(run_pictures({str(tmp_path)!r}, 'reviews'), 'matplotlib' in sys.modules)")
    again = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONPATH": str(REPO)}).stdout
    assert again.strip() == f"{first} False"  # a cached re-run: same files, matplotlib never imported
    assert {key: Path(path).stat().st_mtime_ns for key, path in first.items()} == drawn
    with open(tmp_path / "logs" / "metrics.jsonl", "a") as log:
        log.write(json.dumps({"loss": 0.01, "step": 41, "epoch": 4.1}) + "\n")
    run_pictures(tmp_path, result.name)
    assert Path(first["loss_curve"]).stat().st_mtime_ns > drawn["loss_curve"]  # new steps: drawn again
    assert Path(first["confusion_matrix"]).stat().st_mtime_ns == drawn["confusion_matrix"]


def texts(items) -> list[str]:
    return [item.get_text() for item in items]


def test_each_picture_says_what_it_shows_in_its_title_axis_labels_and_units(tmp_path):
    result = fake_run(tmp_path)
    loss = draw_loss_curve(training_history(tmp_path / "logs" / "metrics.jsonl"), "reviews")
    assert loss.get_suptitle() == "reviews: loss and learning rate during training"
    loss_axes, rate_axes = loss.axes
    assert loss_axes.get_ylabel() == "loss (cross-entropy, nats)"
    assert texts(loss_axes.get_legend().get_texts()) == ["training loss", "validation loss"]
    assert [axes.get_xlabel() for axes in loss_axes.child_axes] == ["epoch"]  # along the top
    assert (rate_axes.get_xlabel(), rate_axes.get_ylabel()) == ("optimiser step", "learning rate")

    confusion = draw_confusion_matrices(result.metrics, [("base model, no adapter", result.baseline),
                                                         ("with the adapter", result.metrics)], "reviews")
    assert confusion.get_suptitle() == "reviews: confusion matrix on the test split (20 examples)"
    *panels, scale = confusion.axes
    assert [axes.get_title() for axes in panels] == ["base model, no adapter\naccuracy 50.0%",
                                                     "with the adapter\naccuracy 90.0%"]
    assert {(axes.get_xlabel(), axes.get_ylabel()) for axes in panels} == {("predicted label", "true label")}
    assert texts(panels[0].get_xticklabels()) == LABELS == texts(panels[0].get_yticklabels())
    assert scale.get_ylabel() == "examples"  # the colour bar counts test examples

    rows = [o.model_dump() for o in grid_result(tmp_path).leaderboard]
    by_setting = draw_metric_by_setting(rows, "accuracy", "v-variations")
    assert by_setting.get_suptitle() == "v-variations: accuracy against each varied setting"
    assert [axes.get_xlabel() for axes in by_setting.axes] == ["learning_rate", "lora.r"]
    assert by_setting.axes[0].get_ylabel() == "accuracy (test split)"
    assert texts(by_setting.axes[0].get_xticklabels()) == ["0.001", "0.01"]
    assert "best at each value" in texts(by_setting.legends[0].get_texts())
    chart = draw_leaderboard_chart(rows, "accuracy", "v-variations", baseline=0.5, threshold=0.8)
    [axes] = chart.axes
    assert axes.get_title(loc="left") == "v-variations: variants ranked by accuracy"
    assert axes.get_xlabel() == "accuracy (test split)"
    assert texts(axes.get_yticklabels()) == ["v-lr0.001", "v-lr0.01"]  # bottom up: the best on top
    assert {"base model 0.5000", "gate 0.8"} <= set(texts(axes.get_legend().get_texts()))


def best_line(figure) -> list[list[float]]:
    """The "best at each value" line of each panel of a metric-by-setting picture."""
    return [list(axes.lines[0].get_ydata()) for axes in figure.axes]


def test_the_grid_picture_joins_the_better_value_of_each_setting_lower_for_a_loss():
    rows = [{"name": f"v{lr}-{r}", "status": "passed", "values": {"learning_rate": lr, "lora.r": r},
             "metrics": {"eval_loss": loss, "accuracy": accuracy}}
            for lr, r, loss, accuracy in ((0.001, 4, 2.0, 0.6), (0.001, 8, 1.5, 0.7), (0.01, 4, 1.0, 0.9),
                                          (0.01, 8, 3.0, 0.4))]
    by_loss = draw_metric_by_setting(rows, "eval_loss", "lm-variations")
    assert best_line(by_loss) == [[1.5, 1.0], [1.0, 1.5]]  # the lowest loss at each learning rate, at each rank
    assert by_loss.axes[0].get_ylabel() == "eval_loss (test split, nats)"
    by_accuracy = draw_metric_by_setting(rows, "accuracy", "lm-variations")
    assert best_line(by_accuracy) == [[0.7, 0.9], [0.9, 0.7]]  # the highest accuracy


def test_a_run_without_logged_steps_or_classes_draws_nothing(tmp_path):
    atomic_write_json(tmp_path / "eval" / "metrics.json", {"eval_loss": 2.0, "perplexity": 7.4})
    assert run_pictures(tmp_path, "lm") == {}


def grid_result(tmp_path: Path) -> VariationsResult:
    rows = []
    for name, status, accuracy, lr in (("v-lr0.01", "passed", 0.9, 0.01), ("v-lr0.001", "failed_gates", 0.6, 0.001)):
        run = tmp_path / name
        run.mkdir()
        (run / "report.html").write_text("<html></html>")
        rows.append(RunOutcome(name=name, status=status, values={"learning_rate": lr, "lora.r": 4},
                               metrics={"accuracy": accuracy}, seconds=1.0, result_path=str(run / "result.json")))
    return VariationsResult(name="v-variations", dataset="v", metric="accuracy", leaderboard=rows, best="v-lr0.01",
                            registry_name="v", registry_version=1, prepared={},
                            paths={"leaderboard": str(tmp_path / "leaderboard.csv")})


def test_reports_render_in_a_real_browser_with_every_image_loaded_and_no_console_errors(tmp_path):
    if browser.CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    run_root = tmp_path / "reviews"
    result = fake_run(run_root)
    pictures = run_pictures(run_root, result.name)
    report = write_run_report(result, pictures, {"MLflow run": "http://127.0.0.1:5000/#/experiments/1/runs/x"},
                              run_root / "report.html")
    page = browser.check_page(report)
    assert page["errors"] == []
    facts = page["facts"]
    assert facts["title"] == "loraflow reviews: passed"
    assert [image["alt"] for image in facts["images"]] == ["Loss and learning rate",
                                                           "Confusion matrix: base model and adapter"]
    assert all(image["complete"] and image["width"] > 0 and image["shown"] > 0 for image in facts["images"])
    assert "Quality gates" in facts["headings"] and facts["tables"] >= 4
    html = report.read_text()
    assert "a &lt;b&gt;great&lt;/b&gt; film &amp; more" in html and "src=\"data:image/png;base64," in html

    grid = grid_result(tmp_path)
    grid_pics = grid_pictures(tmp_path, grid.name, [o.model_dump() for o in grid.leaderboard], "accuracy", 0.5, 0.8)
    assert set(grid_pics) == {"metric_by_setting", "leaderboard_chart"}
    grid_report = write_grid_report(grid, grid_pics, str(run_root / "eval" / "baseline.json"), {},
                                    tmp_path / "report.html")
    page = browser.check_page(grid_report)
    assert page["errors"] == []
    assert len(page["facts"]["images"]) == 2 and all(i["width"] > 0 for i in page["facts"]["images"])
    assert 'href="v-lr0.01/report.html"' in grid_report.read_text()


def test_a_causal_lm_report_shows_prompts_references_and_generations(tmp_path):
    result = fake_run(tmp_path)
    atomic_write_jsonl(tmp_path / "samples" / "predictions.jsonl",
                       [{"prompt": "Q: 2<3?", "reference": "yes", "generated": "yes & more"}])
    result = result.model_copy(update={"task": "causal-lm", "metrics": {"eval_loss": 1.5, "perplexity": 4.48},
                                       "baseline": {"eval_loss": 3.0, "perplexity": 20.1}, "gates": {}})
    html = write_run_report(result, {}, {}, tmp_path / "report.html").read_text()
    assert "Q: 2&lt;3?" in html and "yes &amp; more" in html and "<th>generated</th>" in html
    assert '<span class="better">-1.5000</span>' in html  # a lower loss is the better way
    assert "No gates set." in html and "No pictures" in html


def test_the_summary_artifact_links_the_report_and_pictures(tmp_path):
    result = fake_run(tmp_path)
    pictures = run_pictures(tmp_path, result.name)
    result.paths.update(pictures, report=str(tmp_path / "result.json"), mlflow_run="http://h:5000/#/runs/1")
    markdown = summary_markdown(result)
    assert f"Loss curve: [{pictures['loss_curve']}]({Path(pictures['loss_curve']).as_uri()})" in markdown
    assert "MLflow run: [http://h:5000/#/runs/1](http://h:5000/#/runs/1)" in markdown


def test_a_failed_warning_gate_reads_warn_in_the_mlflow_tag_and_the_report_not_fail(tmp_path):
    result = fake_run(tmp_path)
    gates = check_gates(result.metrics, {"accuracy": 0.8, "f1_macro": Gate(threshold=0.95, severity="warning")})
    result = result.model_copy(update={"gates": {verdict.metric: verdict for verdict in gates}})
    tag = run_record(result, {}, {}, None).tags["loraflow.gates"]
    assert tag == "accuracy pass; f1_macro WARN (warning)"  # f1_macro 0.89 < 0.95: a warning, the run passed
    html = write_run_report(result, {}, {}, tmp_path / "report.html").read_text()
    assert '<span class="badge WARN">WARN (warning)</span>' in html and '<span class="badge pass">pass</span>' in html
    assert ".WARN {" in html  # a style of its own, not the orange of a failed critical gate


def test_tensorboard_gets_final_metrics_and_pictures_without_torch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = fake_run(tmp_path)
    pictures = run_pictures(tmp_path, result.name)
    write_tensorboard(tmp_path / "tb", 40, {"test/accuracy": 0.9}, {"pictures/loss_curve": pictures["loss_curve"]})
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [(s.step, round(s.value, 3)) for s in events.Scalars("test/accuracy")] == [(40, 0.9)]
    assert events.Images("pictures/loss_curve")[0].width == png_size(pictures["loss_curve"])[0]


def test_importing_the_flows_loads_neither_mlflow_nor_matplotlib_nor_tensorboard():
    code = ("import sys, flows.single, flows.variations, flows.batch, tasks.tracking; "
            "print(sorted(m for m in ('mlflow', 'matplotlib', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert json.loads(out.stdout.strip().replace("'", '"')) == []


def test_an_mlflow_run_whose_training_broke_is_ended_failed_or_killed_not_left_running(tmp_path):
    """Nor a run whose results could not all be logged, nor a grid's parent run when the grid broke."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from prefect.logging import disable_run_logger

    from loraflow.config import VariationsParams
    from loraflow.errors import TrainingStopped
    from loraflow.grid import Variant
    from loraflow.plan import RunPlan
    from loraflow.tracking import RunRecord, TrackingParent, log_mlflow_run, start_mlflow_run
    from tasks.tracking import ended_if_failed, grid_ended_if_failed
    from tests.test_train import request_for

    uri = mlflow_uri(None, str(tmp_path))
    status = lambda run_id: MlflowClient(tracking_uri=uri).get_run(run_id).info.status  # noqa: E731
    statuses = {}
    for error in (RuntimeError("the training broke"), TrainingStopped("training stopped on request at step 3")):
        run_id, _ = start_mlflow_run(uri, tmp_path, "failures", type(error).__name__, tags={})
        request = request_for(tmp_path, "/models/x", "causal-lm", []).model_copy(update={"tracking": TrackingRequest(
            run_name="x", report_to=["mlflow"], mlflow_tracking_uri=uri, mlflow_run_id=run_id)})
        with disable_run_logger(), pytest.raises(type(error)), ended_if_failed(request):
            raise error
        statuses[type(error).__name__] = status(run_id)
    assert statuses == {"RuntimeError": "FAILED", "TrainingStopped": "KILLED"}

    run_id, _ = start_mlflow_run(uri, tmp_path, "failures", "half-logged", tags={})
    with pytest.raises(MlflowException):  # the caller's `safely` makes this a warning
        log_mlflow_run(uri, run_id, RunRecord(params={"not/../a name": "x"}))
    assert status(run_id) == "FINISHED"  # the training finished; only some of its results are missing

    parent_id, _ = start_mlflow_run(uri, tmp_path, "grid", "grid", tags={})
    params = VariationsParams(dataset={"path": "d.csv"}, grid={"learning_rate": [0.1, 0.2]}, output_dir=str(tmp_path),
                              mlflow_tracking_uri=uri, tracking=["mlflow"])
    plan = RunPlan(params=params, name="v", model_path="/m", model_identity="m", root=str(tmp_path / "v"),
                   tracking_parent=TrackingParent(experiment="grid", mlflow_run_id=parent_id))
    with disable_run_logger(), pytest.raises(RuntimeError), grid_ended_if_failed(
            params, [(Variant(index=1, name="v", values={}, overrides={}), plan)]):
        raise RuntimeError("registering the best variant broke")
    assert status(parent_id) == "FAILED"
