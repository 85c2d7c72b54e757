"""loraflow on a production-shaped Prefect: a server on PostgreSQL, two CPU workers and a GPU
worker with two slots (`production` fixture), under load and under faults, everything started
through the REST API as a team's scheduler would. What must hold: every run ends in a state that
says why, nothing produced is lost, and no adapter is registered twice.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loraflow.registry import Registry
from loraflow.train.checkpoints import find_resumable_checkpoint
from tests.production_stack import (
    HEARTBEAT_S,
    ZOMBIE_AFTER_S,
    create_run,
    flow_runs,
    healthy,
    load_figures,
    training_runs,
    wait_finished,
    wait_for,
)
from tests.test_flow_batch import write_jsonl
from tests.test_flow_single import write_messy_csv
from tests.tiny_models import easy_classification_examples

pytestmark = [pytest.mark.slow, pytest.mark.production]

TINY = {"num_epochs": 1, "learning_rate": 0.005, "save_steps": 10, "batch_size": 8, "max_length": 32}
DATASETS = 12  # one of them malformed
GRID = {"learning_rate": [0.002, 0.005, 0.01], "lora.r": [2, 4]}


def children(api: str, parent_id: str, flow: str) -> dict[str, dict]:
    """The runs of subflow `flow` directly under `parent_id`, by name."""
    runs = flow_runs(api, flow_runs={"parent_flow_run_id": {"any_": [parent_id]}}, flows={"name": {"any_": [flow]}})
    return {run["name"]: run for run in runs}


def registered_versions(registry: Path, name: str) -> list[int]:
    return [version.version for version in Registry(registry).index(name).versions]


@pytest.fixture(scope="module")
def load(production, tmp_path_factory):
    """A 12-dataset parallel batch and a 6-point grid, created together with two REST calls."""
    api, root = production["api"], tmp_path_factory.mktemp("load")
    paths = [write_messy_csv(root / f"d{index:02}.csv", easy_classification_examples(36, seed=index))
             for index in range(DATASETS - 1)]
    paths.append(write_jsonl(root / "broken.jsonl", [{"words": "no text column here", "label": "x"}] * 8))
    output = root / "runs"
    common = {"overrides": TINY, "output_dir": str(output), "shard_size": 40}
    batch_params = {**common, "datasets": [{"path": str(path)} for path in paths], "max_parallel": 6}
    grid_data = write_messy_csv(root / "grid.csv", easy_classification_examples(36, seed=99))
    grid_params = {**common, "dataset": {"path": str(grid_data)}, "grid": GRID}
    started = time.monotonic()
    ids = {"batch": create_run(api, "batch/loraflow", batch_params),
           "variations": create_run(api, "variations/loraflow", grid_params)}
    runs = wait_finished(api, list(ids.values()), timeout=900)
    wall = time.monotonic() - started
    return {"api": api, "output": output, "runs": {name: runs[run_id] for name, run_id in ids.items()},
            "wall": wall, "paths": paths}


def test_every_dataset_of_a_parallel_batch_ends_completed_or_failed_with_its_reason(load):
    api, batch = load["api"], load["runs"]["batch"]
    assert batch["state_type"] == "FAILED" and batch["state"]["message"].startswith(
        f"batch: 1 of {DATASETS} datasets failed: broken ("), batch["state"]["message"]
    singles = children(api, batch["id"], "single")
    assert len(singles) == DATASETS
    assert {name: run["state_type"] for name, run in singles.items()} == {
        **{path.stem: "COMPLETED" for path in load["paths"][:-1]}, "broken": "FAILED"}
    assert "required column 'text' not found" in singles["broken"]["state"]["message"]

    result = json.loads((load["output"] / "batch" / "batch_result.json").read_text())
    entries = {entry["name"]: entry for entry in result["datasets"]}
    assert {name: entry["status"] != "error" for name, entry in entries.items()} == {
        name: run["state_type"] == "COMPLETED" for name, run in singles.items()}
    trains = training_runs(api)
    for name, entry in entries.items():
        if name == "broken":
            assert entry["registry_version"] is None and f"train-{name}" not in trains
            continue
        assert trains[f"train-{name}"]["state_type"] == "COMPLETED", name
        assert entry["registry_version"] == 1 and registered_versions(load["output"] / "registry", name) == [1], name
        assert Path(entry["adapter_path"], "adapter_model.safetensors").is_file(), name


def test_every_variant_of_the_grid_trains_once_and_only_the_best_is_registered(load):
    api, grid = load["api"], load["runs"]["variations"]
    assert grid["state_type"] == "COMPLETED", grid["state"]["message"]
    variants = children(api, grid["id"], "train-evaluate")
    assert len(variants) == 6 and {run["state_type"] for run in variants.values()} == {"COMPLETED"}
    with open(load["output"] / "grid-variations" / "leaderboard.csv", newline="") as handle:
        board = list(csv.DictReader(handle))
    assert sorted(row["name"] for row in board) == sorted(variants)
    trains = training_runs(api)
    assert all(trains[f"train-{name}"]["state_type"] == "COMPLETED" for name in variants)
    best = Registry(load["output"] / "registry").resolve("grid", "best")
    assert registered_versions(load["output"] / "registry", "grid") == [best.version]
    top = next(row for row in board if row["status"] == "passed")
    settings = best.card["config"]["settings"]
    assert (settings["learning_rate"], settings["lora"]["r"]) == (float(top["learning_rate"]), int(top["lora.r"]))
    summary = json.loads((load["output"] / "grid-variations" / "variations_result.json").read_text())
    assert (summary["best"], summary["registry_version"]) == (top["name"], best.version)


def test_load_figures(load, production, record_property):
    """Runs per minute, creation-to-training-start latency and peak memory, printed into the CI log."""
    figures = load_figures(load["api"], [run["id"] for run in load["runs"].values()], load["wall"],
                           production["processes"])
    (load["output"] / "load_figures.json").write_text(json.dumps(figures, indent=2))
    record_property("figures: loraflow on PostgreSQL under load", figures)
    assert figures["trainings"] == DATASETS - 1 + 6 and figures["peak_rss_mib"]["server"] > 0


def slow_single(root: Path, name: str, epochs: int = 5) -> dict:
    """A `single` run long enough to be hit mid-training (~9 steps an epoch, a checkpoint every 4)."""
    data = root / f"{name}.csv"
    if not data.exists():
        write_messy_csv(data, easy_classification_examples(90, seed=7))
    return {"dataset": {"path": str(data)}, "output_dir": str(root / "runs"), "shard_size": 200,
            "overrides": {**TINY, "num_epochs": epochs, "save_steps": 4}}


def gpu_slots_in_use(api: str) -> int:
    return httpx.get(f"{api}/v2/concurrency_limits/gpu", timeout=10).json()["active_slots"]


def test_gpu_worker_killed_mid_training_crashes_the_run_frees_its_slots_and_the_rerun_resumes(production, tmp_path):
    api, processes = production["api"], production["processes"]
    params = slow_single(tmp_path, "killed")
    first = create_run(api, "single/loraflow", params)
    checkpoints = tmp_path / "runs" / "killed" / "checkpoints"
    wait_for("a first checkpoint", lambda: find_resumable_checkpoint(checkpoints, log=lambda _: None), timeout=300,
             interval=0.5)
    processes.lose("gpu-1")  # the worker, its flow run and the training: a lost machine
    killed_at = time.monotonic()
    try:
        step = int(Path(find_resumable_checkpoint(checkpoints, log=lambda _: None)).name.split("-")[1])
        pipeline = wait_finished(api, [first], timeout=240)[first]
        train = training_runs(api)["train-killed"]
        assert train["state_type"] == "CRASHED" and "no heartbeat" in train["state"]["message"], train["state"]
        assert pipeline["state_type"] == "FAILED" and "train-killed" in pipeline["state"]["message"]
        wait_for("the killed training's gpu slots to come back", lambda: gpu_slots_in_use(api) == 0, timeout=120)
        assert time.monotonic() - killed_at < ZOMBIE_AFTER_S + HEARTBEAT_S + 90  # crashed, then the lease lapsed
        assert not (tmp_path / "runs" / "killed" / "model" / "adapter_model.safetensors").exists()
    finally:
        processes.restart("gpu-1")  # the other tests need it
    again = create_run(api, "single/loraflow", params)
    rerun = wait_finished(api, [again], timeout=400)[again]
    assert rerun["state_type"] == "COMPLETED", rerun["state"]["message"]
    result = json.loads((tmp_path / "runs" / "killed" / "result.json").read_text())
    assert result["train"]["resumed_from_step"] == step and result["cached"]["prepare"] is True
    assert registered_versions(tmp_path / "runs" / "registry", "killed") == [1]


def test_postgresql_refusing_connections_for_seconds_is_carried_through_by_retries(production, tmp_path):
    """Every pooled connection is cut and new ones refused for 8 s while a run trains; the server
    answers 503 meanwhile and the clients' retries carry the run to the end."""
    api = production["api"]
    params = slow_single(tmp_path, "outage", epochs=3)
    run = create_run(api, "single/loraflow", params)
    wait_for("training to start", lambda: training_runs(api).get("train-outage", {}).get("state_type") == "RUNNING",
             timeout=300)
    production["proxy"].outage(8)
    finished = wait_finished(api, [run], timeout=400)[run]
    assert finished["state_type"] == "COMPLETED", finished["state"]["message"]
    assert training_runs(api)["train-outage"]["state_type"] == "COMPLETED"
    assert registered_versions(tmp_path / "runs" / "registry", "outage") == [1]


@pytest.fixture
def small_volume(tmp_path) -> Iterator[Path]:
    """A 64 MiB tmpfs as the output volume (the machine must allow `mount`: root in CI)."""
    volume = tmp_path / "volume"
    volume.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(volume)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"this machine refuses a tmpfs mount ({mounted.stderr.strip()}): the full-volume test needs one")
    try:
        yield volume
    finally:
        subprocess.run(["umount", "-l", str(volume)], check=False)


def fill(volume: Path) -> Path:
    """Write a file until the volume has no byte left (unbuffered: nothing is left to flush on close)."""
    filler = volume / "filler"
    handle = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (2**20, 2**12, 1):
            try:
                while os.write(handle, b"\0" * size):
                    pass
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
    finally:
        os.close(handle)
    return filler


def test_a_full_output_volume_fails_the_run_in_one_line_and_leaves_nothing_half_written(production, small_volume,
                                                                                        tmp_path):
    api = production["api"]
    params = {**slow_single(tmp_path, "full", epochs=3), "output_dir": str(small_volume / "runs")}
    run = create_run(api, "single/loraflow", params)
    job = small_volume / "runs" / "full" / ".training" / "job.json"
    wait_for("training to start", job.exists, timeout=300, interval=0.2)
    filler = fill(small_volume)
    failed = wait_finished(api, [run], timeout=300)[run]
    message = failed["state"]["message"]
    assert failed["state_type"] == "FAILED", message
    assert "No space left on device" in message and str(small_volume) in message and "\n" not in message, message
    folder = small_volume / "runs" / "full"
    assert not (folder / "model" / "adapter_model.safetensors").exists()
    assert not (small_volume / "runs" / "registry" / "full").exists()
    checkpoint = find_resumable_checkpoint(folder / "checkpoints", log=lambda _: None)

    filler.unlink()
    again = create_run(api, "single/loraflow", params)
    rerun = wait_finished(api, [again], timeout=400)[again]
    assert rerun["state_type"] == "COMPLETED", rerun["state"]["message"]
    result = json.loads((folder / "result.json").read_text())
    assert result["train"]["resumed_from_step"] == (int(Path(checkpoint).name.split("-")[1]) if checkpoint else None)
    assert registered_versions(small_volume / "runs" / "registry", "full") == [1]


def test_a_server_restart_under_a_running_batch_loses_nothing_and_the_rerun_uses_the_cache(production, tmp_path):
    api, processes = production["api"], production["processes"]
    paths = [write_messy_csv(tmp_path / f"restart{index}.csv", easy_classification_examples(36, seed=40 + index))
             for index in range(3)]
    params = {"overrides": TINY, "output_dir": str(tmp_path / "runs"), "shard_size": 40, "max_parallel": 3,
              "datasets": [{"path": str(path)} for path in paths]}
    first = create_run(api, "batch/loraflow", params)
    wait_for("a training of the batch to start", lambda: any(
        name.startswith("train-restart") and run["state_type"] == "RUNNING" for name, run in training_runs(api).items()),
        timeout=300)
    processes.kill("server")
    processes.restart("server")
    wait_for("the restarted server's /api/health", lambda: healthy(api), timeout=120)

    ended = wait_finished(api, [first], timeout=600)[first]
    assert ended["state_type"] == "COMPLETED" or ended["state"]["message"], ended["state"]
    again = create_run(api, "batch/loraflow", params)
    rerun = wait_finished(api, [again], timeout=600)[again]
    assert rerun["state_type"] == "COMPLETED", rerun["state"]["message"]
    result = json.loads((tmp_path / "runs" / "batch" / "batch_result.json").read_text())
    assert [entry["status"] for entry in result["datasets"]] == ["passed"] * 3
    for entry in result["datasets"]:
        assert "prepare" in entry["cached_stages"], entry  # prepared before the restart, not again
        assert registered_versions(tmp_path / "runs" / "registry", entry["name"]) == [1]
