"""The `variations` flow under a real Prefect server: a 2x2 grid from one preparation, its
leaderboard and best pick, and a zip group that varies the sequence length."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, FlowRunFilter

from flows.variations import variations
from loraflow.config import VariationsParams
from loraflow.registry import Registry
from tests.test_flow_single import FAST_CLASSIFICATION, write_messy_csv
from tests.tiny_models import easy_classification_examples

GRID = {"learning_rate": [0.002, 0.01], "lora.r": [2, 8]}


def grid_params(tmp_path: Path, **changes) -> VariationsParams:
    data = write_messy_csv(tmp_path / "reviews.csv", easy_classification_examples(90, seed=1))
    return VariationsParams(**{
        "dataset": {"path": str(data)},
        "overrides": {**FAST_CLASSIFICATION, "num_epochs": 2},
        "grid": GRID,
        "gates": {"accuracy": 0.5},
        "output_dir": str(tmp_path / "runs"),
        "shard_size": 40,
        **changes,
    })


def run_tree(flow_run_id) -> tuple[list[str], dict[str, str]]:
    """The run's own task runs, and its subflow runs (name -> flow name)."""
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [flow_run_id]}))
        flows = {flow.id: flow.name for flow in client.read_flows()}
    return [task.name for task in tasks], {run.name: flows[run.flow_id] for run in children}


@pytest.fixture(scope="module")
def grid_run(prefect_server, tmp_path_factory):
    params = grid_params(tmp_path_factory.mktemp("grid"))
    return params, variations(params, return_state=True)


def test_a_2x2_grid_trains_four_adapters_each_in_its_own_folder(grid_run):
    params, state = grid_run
    assert state.is_completed(), state.message
    root = Path(params.output_dir) / "reviews-variations"
    names = sorted(path.name for path in root.iterdir() if path.is_dir() and path.name not in ("data", "eval"))
    assert names == ["reviews_classification-small_learning_rate0.002-r2", "reviews_classification-small_learning_rate0.002-r8",
                     "reviews_classification-small_learning_rate0.01-r2", "reviews_classification-small_learning_rate0.01-r8"]
    for outcome in state.result().leaderboard:
        folder = root / outcome.name
        assert outcome.adapter_path == str(folder / "model")
        assert (folder / "model" / "adapter_model.safetensors").is_file(), outcome.name
        settings = yaml.safe_load((folder / "config" / "resolved.yaml").read_text())["settings"]
        assert {"learning_rate": settings["learning_rate"], "lora.r": settings["lora"]["r"]} == outcome.values
        assert settings["num_epochs"] == 2


def test_the_dataset_is_prepared_and_tokenised_once_for_every_variant(grid_run):
    params, state = grid_run
    tasks, children = run_tree(state.state_details.flow_run_id)
    assert sum(name.startswith("prepare-dataset") for name in tasks) == 1
    assert sum(name.startswith("evaluate") for name in tasks) == 1  # the base-model baseline
    assert sorted(children.values()) == ["tokenize-dataset"] + ["train-evaluate"] * 4
    result = state.result()
    assert set(result.prepared["timings"]) == {"prepare", "tokenize", "baseline"}
    manifests = {json.loads(Path(o.result_path).read_text())["paths"]["manifest"] for o in result.leaderboard}
    assert manifests == {str(Path(params.output_dir).resolve() / "reviews-variations" / "data" / "manifest.json")}


def test_the_leaderboard_ranks_every_variant_and_the_best_is_registered(grid_run):
    params, state = grid_run
    result = state.result()
    root = Path(params.output_dir) / "reviews-variations"
    with open(root / "leaderboard.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:4] == ["name", "status", "learning_rate", "lora.r"]
    assert {"accuracy", "f1_macro", "gate accuracy", "seconds", "adapter"} <= set(rows[0])
    accuracies = [float(row["accuracy"]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True) and len(rows) == 4
    assert all(float(row["seconds"]) > 0 for row in rows)
    best = next(row for row in rows if row["status"] == "passed")
    assert result.best == best["name"] and state.message == result.message

    registry = Registry(params.registry_root)
    version = registry.resolve("reviews", "best")
    assert [v.version for v in registry.index("reviews").versions] == [version.version]
    settings = version.card["config"]["settings"]
    assert (settings["learning_rate"], settings["lora"]["r"]) == (float(best["learning_rate"]), int(best["lora.r"]))
    assert "production" not in registry.index("reviews").aliases
    with get_client(sync_client=True) as client:
        key = "reviews-variations-leaderboard"
        # this grid's own artifact: other tests' grids on the session's server use the same key
        this_run = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
        artifact = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                                                        flow_run_id=this_run))[0]
    assert [row["name"] for row in json.loads(artifact.data)] == [row["name"] for row in rows]


def test_variant_subflow_runs_are_named_by_the_template(grid_run):
    _, state = grid_run
    _, children = run_tree(state.state_details.flow_run_id)
    assert sorted(name for name, flow in children.items() if flow == "train-evaluate") == sorted(
        o.name for o in state.result().leaderboard)


def test_a_zip_group_over_max_length_tokenises_twice_from_one_preparation(prefect_server, tmp_path):
    params = grid_params(tmp_path, grid={}, zip=[{"max_length": [24, 40], "num_epochs": [1, 1]}],
                         name_template="len{max_length}", gates={"accuracy": 1.01}, name="lengths")
    state = variations(params, return_state=True)
    assert state.is_failed() and state.message == "lengths: no variant passed its gates"
    result = state.result(raise_on_failure=False)
    assert sorted(o.name for o in result.leaderboard) == ["len24", "len40"]
    assert set(result.prepared["timings"]) == {"prepare", "tokenize", "tokenize-40", "baseline"}
    tasks, _ = run_tree(state.state_details.flow_run_id)
    assert sum(name.startswith("prepare-dataset") for name in tasks) == 1
    for outcome in result.leaderboard:
        resolved = yaml.safe_load((Path(outcome.result_path).parent / "config" / "resolved.yaml").read_text())
        assert resolved["settings"]["max_length"] == int(outcome.name.removeprefix("len"))
    assert not Registry(params.registry_root).index("reviews").versions


def test_python_flows_variations_with_two_device_slots_trains_two_variants_at_a_time(prefect_server, tmp_path):
    """`python flows/variations.py grid.yaml` on a host with two CPU slots: the variants' trainings overlap."""
    from tests.test_crash_resume import start_run

    params = grid_params(tmp_path, grid={"learning_rate": [0.002, 0.01]}, gpu_concurrency_limit="gpu-parallel-grid")
    params = params.model_copy(update={"overrides": {**params.overrides, "num_epochs": 4}})
    env = {"LORAFLOW_CPU_DEVICES": "2", "LORAFLOW_DEVICE_LOCKS": str(tmp_path / "locks")}
    process = start_run(params.model_dump(mode="json", exclude_defaults=True), tmp_path / "grid.yaml",
                        script="variations.py", env=env)
    assert process.wait(timeout=600) == 0, (tmp_path / "grid.log").read_text()[-4000:]

    root = Path(params.output_dir) / "reviews-variations"
    trains = [json.loads(path.read_text())["train"] for path in sorted(root.glob("*/result.json"))]
    assert len(trains) == 2
    (first, second) = sorted(trains, key=lambda train: train["started_at"])
    assert second["started_at"] < first["finished_at"], f"trainings did not overlap: {trains}"
    assert {device for train in trains for device in train["devices"]} == {"cpu:0", "cpu:1"}
    assert all(train["processes"] == 1 for train in trains)
