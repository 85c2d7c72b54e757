"""The `batch` flow under a real Prefect server: three datasets (one malformed) side by side,
stopping at the first failure, and the batch parameters' own checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter

from flows.batch import batch
from loraflow.batch import BatchResult, dataset_runs
from loraflow.config import BatchParams
from loraflow.errors import ConfigError, DataError
from loraflow.registry import Registry
from tests.test_flow_single import FAST_CLASSIFICATION, write_messy_csv
from tests.tiny_models import easy_classification_examples


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def three_datasets(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "alpha": write_messy_csv(folder / "alpha.csv", easy_classification_examples(60, seed=1)),
        "broken": write_jsonl(folder / "broken.jsonl", [{"words": "no text column here", "label": "x"}] * 8),
        "beta": write_jsonl(folder / "beta.jsonl", easy_classification_examples(60, seed=2)),
    }


def batch_params(tmp_path: Path, paths: list[Path], **changes) -> BatchParams:
    return BatchParams(**{
        "datasets": [{"path": str(path)} for path in paths],
        "overrides": {**FAST_CLASSIFICATION, "num_epochs": 3},
        "gates": {"accuracy": 0.6},
        "output_dir": str(tmp_path / "runs"),
        "shard_size": 40,
        **changes,
    })


def subflow_runs(parent_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [parent_id]}))
    return {run.name: run.state.type.value for run in runs}


@pytest.fixture(scope="module")
def batch_with_a_malformed_dataset(prefect_server, tmp_path_factory):
    """Two good datasets and a malformed one, two at a time (shared by several tests: training costs)."""
    tmp_path = tmp_path_factory.mktemp("batch")
    data = three_datasets(tmp_path / "data")
    params = batch_params(tmp_path, list(data.values()), strategy="parallel", max_parallel=2)
    return params, batch(params, return_state=True)


def test_a_malformed_dataset_fails_the_batch_by_name_after_the_others_trained(batch_with_a_malformed_dataset):
    params, state = batch_with_a_malformed_dataset
    assert state.is_failed()
    assert state.message.startswith("batch: 1 of 3 datasets failed: broken (")
    assert "broken.jsonl: required column 'text' not found" in state.message
    assert "alpha" not in state.message and "beta" not in state.message
    runs = Path(params.output_dir)
    for name in ("alpha", "beta"):
        assert (runs / name / "model" / "adapter_model.safetensors").is_file(), name
        assert Registry(params.registry_root).resolve(name, "production").version == 1
    assert not (runs / "broken" / "model").exists()


def test_batch_result_json_describes_every_dataset(batch_with_a_malformed_dataset):
    params, state = batch_with_a_malformed_dataset
    on_disk = json.loads((Path(params.output_dir) / "batch" / "batch_result.json").read_text())
    assert BatchResult.model_validate(on_disk) == state.result(raise_on_failure=False)
    entries = {entry["name"]: entry for entry in on_disk["datasets"]}
    assert list(entries) == ["alpha", "broken", "beta"]
    for name in ("alpha", "beta"):
        entry = entries[name]
        assert entry["status"] == "passed" and entry["error"] is None
        assert entry["metrics"]["accuracy"] >= 0.6 and entry["gates"]["accuracy"]["passed"] is True
        assert entry["adapter_path"] == str(Path(params.output_dir).resolve() / name / "model")
        assert entry["registry_version"] == 1
        assert set(entry["timings"]) == {"prepare", "tokenize", "baseline", "train", "evaluate", "samples", "register"}
        assert entry["seconds"] > 0 and Path(entry["result_path"]).is_file()
    broken = entries["broken"]
    assert broken["status"] == "error" and "required column 'text' not found" in broken["error"]
    assert broken["adapter_path"] is None and broken["metrics"] == {}


def test_each_dataset_is_its_own_subflow_run_and_the_batch_publishes_a_table(batch_with_a_malformed_dataset):
    _, state = batch_with_a_malformed_dataset
    assert subflow_runs(state.state_details.flow_run_id) == {"alpha": "COMPLETED", "beta": "COMPLETED",
                                                             "broken": "FAILED"}
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["batch-batch"])))
    table = json.loads(artifacts[0].data)
    assert [row["name"] for row in table] == ["alpha", "broken", "beta"]
    assert [row["status"] for row in table] == ["passed", "error", "passed"]


def test_without_continue_on_error_the_batch_stops_at_the_first_failure(prefect_server, tmp_path):
    data = three_datasets(tmp_path / "data")
    params = batch_params(tmp_path, [data["broken"], data["alpha"]], strategy="sequential", continue_on_error=False)
    state = batch(params, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("batch: 1 of 2 datasets failed: broken (")
    assert state.message.endswith("; not started: alpha")
    result = state.result(raise_on_failure=False)
    assert [(o.name, o.status) for o in result.datasets] == [("broken", "error"), ("alpha", "skipped")]
    assert not (Path(params.output_dir) / "alpha").exists()


def test_datasets_dir_makes_each_file_and_subfolder_a_dataset(tmp_path):
    folder = tmp_path / "exports"
    three_datasets(folder)
    (folder / "gamma").mkdir()
    write_jsonl(folder / "gamma" / "part-1.jsonl", easy_classification_examples(9))
    (folder / "notes.md").write_text("not data")
    (folder / ".hidden.csv").write_text("text,label\n")
    params = BatchParams(datasets_dir=str(folder), dataset_options={"text_column": "body"}, overrides={"lora.r": 4},
                         output_dir=str(tmp_path / "runs"))
    runs = dataset_runs(params)
    assert [run.dataset.resolved_name for run in runs] == ["alpha", "beta", "broken", "gamma"]
    assert {run.dataset.text_column for run in runs} == {"body"}
    assert runs[0].overrides == {"lora": {"r": 4}} and runs[0].output_dir == str(tmp_path / "runs")


def test_each_dataset_may_bring_its_own_settings():
    params = BatchParams(
        datasets=[{"path": "a.csv"}, {"path": "b.csv", "name": "bee", "label_column": "queue",
                                      "overrides": {"lora": {"alpha": 4}, "num_epochs": 1}, "gates": {"f1_macro": 0.5}}],
        dataset_options={"text_column": "body"}, overrides={"lora.r": 4, "num_epochs": 3}, gates={"accuracy": 0.8},
    )
    first, second = dataset_runs(params)
    assert (first.dataset.text_column, first.gates, first.overrides) == ("body", {"accuracy": 0.8},
                                                                          {"lora": {"r": 4}, "num_epochs": 3})
    assert (second.dataset.resolved_name, second.dataset.text_column, second.dataset.label_column) == ("bee", "body",
                                                                                                     "queue")
    assert second.overrides == {"lora": {"r": 4, "alpha": 4}, "num_epochs": 1} and second.gates == {"f1_macro": 0.5}


@pytest.mark.parametrize("changes, message", [
    ({"datasets": [{"path": "x/a.csv"}, {"path": "y/a.jsonl"}]},
     "datasets.1: dataset name 'a' is already used by datasets.0; give one of them a distinct `name`"),
    ({"datasets": [{"path": "a.csv", "name": "batch"}]},
     "datasets.0: dataset name 'batch' is the batch's own folder name; rename one of them"),
    ({"datasets": [{"path": "a.csv", "overrides": {"lora.rank": 2}}]},
     "datasets.0: overrides: unknown key 'lora.rank' (did you mean 'lora.r'?)"),
    ({"datasets": [], "datasets_dir": None}, "give either `datasets` (a list of dataset specs) or `datasets_dir`"),
    ({"datasets": [{"path": "a.csv"}], "datasets_dir": "data"}, "give either `datasets`"),
])
def test_bad_batches_are_refused_before_anything_runs(changes, message):
    with pytest.raises(ValueError) as raised:
        BatchParams(**changes)
    assert message in str(raised.value)


def test_datasets_dir_problems_are_one_line(tmp_path):
    with pytest.raises(DataError, match="datasets_dir: .* holds no datasets; add data files"):
        dataset_runs(BatchParams(datasets_dir=str(tmp_path)))
    (tmp_path / "a.csv").write_text("text,label\n")
    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="datasets_dir: a.jsonl: dataset name 'a' is already used by datasets_dir: a.csv"):
        dataset_runs(BatchParams(datasets_dir=str(tmp_path)))
