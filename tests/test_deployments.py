"""loraflow as deployments, the way a user runs it: a real `prefect server` on a free loopback
port, `python deployments/setup.py`, one process worker per pool, and `single` started
through the REST API. Its training must run as a flow run of `train/gpu` on the GPU pool.

Every wait is bounded, and the server and workers (with their flow-run subprocesses) are
torn down also when a test fails.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.setup import UNRESPONSIVE
from loraflow.registry import Registry
from tests.production_stack import (
    REPO,
    SETUP,
    TERMINAL,
    ancestors,
    create_run,
    deployment_id,
    flow_runs,
    prefect_stack,
    resume_run,
    training_runs,
    wait_finished,
    wait_for,
)
from tests.test_flow_single import FAST_CLASSIFICATION, write_messy_csv
from tests.tiny_models import easy_classification_examples


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Server (SQLite), set-up and one worker per pool, all in a temp dir of their own."""
    with prefect_stack(tmp_path_factory.mktemp("deployments")) as running:
        yield running


@pytest.fixture(scope="module")
def single_run(stack) -> dict[str, Any]:
    """`single/loraflow` started with a plain REST call, waited for (bounded)."""
    api, root = stack["api"], stack["root"]
    data = write_messy_csv(root / "reviews.csv", easy_classification_examples(90, seed=1))
    params = {"dataset": {"path": str(data)}, "overrides": FAST_CLASSIFICATION, "gates": {"accuracy": 0.8},
              "output_dir": str(root / "runs"), "shard_size": 40}
    run_id = create_run(api, "single/loraflow", params)
    try:
        run = wait_finished(api, [run_id], timeout=240)[run_id]
    except pytest.fail.Exception:
        processes = stack["processes"]
        print(processes.tail("worker-loraflow-cpu"), processes.tail("worker-loraflow-gpu"), sep="\n")
        raise
    return {"run": run, "params": params}


def test_setup_creates_pools_limits_blocks_and_deployments(stack):
    api = stack["api"]
    pools = {pool["name"]: pool["type"] for pool in httpx.post(f"{api}/work_pools/filter", json={}).json()}
    assert pools["loraflow-cpu"] == pools["loraflow-gpu"] == "process"
    limit = httpx.get(f"{api}/v2/concurrency_limits/gpu").json()
    assert limit["limit"] == 1
    train = httpx.get(f"{api}/deployments/name/train/gpu").json()
    assert train["work_pool_name"] == "loraflow-gpu"
    single = httpx.get(f"{api}/deployments/name/single/loraflow").json()
    assert single["work_pool_name"] == "loraflow-cpu" and "loraflow" in single["tags"]
    for name in ("batch/loraflow", "variations/loraflow", "registry/loraflow"):
        assert httpx.get(f"{api}/deployments/name/{name}").json()["work_pool_name"] == "loraflow-cpu"
    assert single["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert [schedule["active"] for schedule in single["schedules"]] == [False]  # the example schedule is paused
    assert single["parameter_openapi_schema"]["definitions"]["SingleParams"]["properties"]["dataset"]
    for slug in ("loraflow-storage/default", "loraflow-training-infrastructure/default"):
        block_type, name = slug.split("/")
        assert httpx.get(f"{api}/block_types/slug/{block_type}/block_documents/name/{name}").status_code == 200


def test_invalid_parameters_are_refused_when_the_run_is_created(stack):
    api = stack["api"]
    response = httpx.post(f"{api}/deployments/{deployment_id(api, 'single/loraflow')}/create_flow_run",
                          json={"parameters": {"params": {"dataset": {"path": "x.csv"}, "shard_size": 0}}})
    assert response.status_code == 409 and "shard_size" in response.text


def test_single_via_rest_trains_on_the_gpu_pool(stack, single_run):
    api, run = stack["api"], single_run["run"]
    assert run["state_type"] == "COMPLETED", run["state"]
    train_deployment = httpx.get(f"{api}/deployments/name/train/gpu").json()
    trains = flow_runs(api, deployments={"id": {"any_": [train_deployment["id"]]}})
    assert len(trains) == 1
    child = trains[0]
    assert child["state_type"] == "COMPLETED" and child["work_pool_name"] == "loraflow-gpu"
    assert child["job_variables"]["env"]["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == "local-file-system/loraflow-results"
    assert ancestors(api, child)[-1] == run["id"]  # nested in this very `single` run
    # The parent read the child's persisted result from the shared storage block.
    assert any((stack["root"] / "storage" / ".loraflow-results").iterdir())
    root = Path(single_run["params"]["output_dir"]) / "reviews"
    assert (root / "model" / "adapter_model.safetensors").is_file()
    result = (root / "result.json").read_text()
    assert '"status": "passed"' in result and '"registry_version": 1' in result


def test_events_carry_dataset_version_and_paths(stack, single_run):
    expected = {"loraflow.dataset.prepared", "loraflow.model.trained", "loraflow.gates.passed",
                "loraflow.model.registered"}

    def emitted() -> dict[str, dict] | None:  # the server persists events in batches
        response = httpx.post(f"{stack['api']}/events/filter",
                              json={"filter": {"event": {"prefix": ["loraflow."]}}, "limit": 50}, timeout=10)
        events = {event["event"]: event for event in response.json()["events"]}
        return events if expected <= set(events) else None

    events = wait_for(f"events {sorted(expected)}", emitted, timeout=30)
    registered = events["loraflow.model.registered"]["resource"]
    assert registered["loraflow.dataset.name"] == "reviews" and registered["loraflow.version"] == "1"
    assert Path(registered["loraflow.path.registry"]).is_dir()
    assert events["loraflow.model.trained"]["resource"]["loraflow.path.adapter"].endswith("reviews/model")


def test_dataset_updated_event_starts_single_on_that_path(stack, single_run):
    api, path = stack["api"], str(stack["root"] / "no-such-dataset.csv")  # fails fast once started
    event = {"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(),
             "event": "loraflow.dataset.updated",
             "resource": {"prefect.resource.id": "loraflow.dataset.tickets", "loraflow.dataset.path": path}}
    assert httpx.post(f"{api}/events", json=[event]).status_code == 204
    single = deployment_id(api, "single/loraflow")

    def triggered() -> list[dict]:
        runs = flow_runs(api, deployments={"id": {"any_": [single]}})
        return [run for run in runs if (run.get("created_by") or {}).get("type") == "AUTOMATION"]

    runs = wait_for("the automation to start single", triggered, timeout=60)
    assert runs[0]["parameters"] == {"params": {"dataset": {"path": path}}}


def test_setup_is_idempotent(stack, single_run):
    api = stack["api"]
    before = {name: deployment_id(api, name) for name in ("single/loraflow", "train/gpu")}
    again = subprocess.run(SETUP + ["--storage", str(stack["root"] / "storage")], cwd=REPO, env=stack["env"],
                           capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    changed = [line for line in again.stdout.splitlines() if line.split()[-1] in {"created", "saved", "set"}]
    assert changed == [], again.stdout
    assert {name: deployment_id(api, name) for name in before} == before
    automations = [automation["name"] for automation in httpx.post(f"{api}/automations/filter", json={}).json()]
    assert len(automations) == 2 and UNRESPONSIVE in automations  # the dataset trigger, and crashing zombie runs


def _flow_run_processes(run_id: str) -> list[int]:
    """Pids of this host's processes running flow run `run_id` (a process worker gives each its id)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PREFECT__FLOW_RUN_ID={run_id}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_approval_suspends_the_run_and_an_answer_over_rest_promotes_or_rejects_it(stack, single_run):
    """`approval: required` on a deployment run: it suspends (its process ends while it waits), is
    answered through the REST API, starts again on the worker, trains nothing again, and promotes
    (approve) or records the rejection (reject)."""
    api, root = stack["api"], stack["root"]
    runs = {}
    for name, seed in (("approved", 3), ("rejected", 4)):
        data = write_messy_csv(root / f"{name}.csv", easy_classification_examples(90, seed=seed))
        runs[name] = create_run(api, "single/loraflow", {
            "dataset": {"path": str(data)}, "overrides": FAST_CLASSIFICATION, "gates": {"accuracy": 0.8},
            "output_dir": str(root / "runs"), "shard_size": 40, "approval": "required"})

    def suspended() -> dict[str, dict] | None:
        found = {run["id"]: run for run in flow_runs(api, flow_runs={"id": {"any_": list(runs.values())}})}
        assert not any(run["state_type"] in TERMINAL for run in found.values()), found
        return found if all(run["state_name"] == "Suspended" for run in found.values()) else None

    try:
        wait_for("both runs to suspend for approval", suspended, timeout=420, interval=3)
    except pytest.fail.Exception:
        print(stack["processes"].tail("worker-loraflow-cpu"), stack["processes"].tail("worker-loraflow-gpu"), sep="\n")
        raise
    # The suspended state is set before the flow-run process has flushed its logs and exited: give it
    # a bounded time, then nothing of it may be left while it waits.
    wait_for("the suspended runs' processes to exit",
             lambda: not any(_flow_run_processes(run_id) for run_id in runs.values()), timeout=60)
    assert all(flow_runs(api, flow_runs={"id": {"any_": [run_id]}})[0]["state_name"] == "Suspended"
               for run_id in runs.values()), "still waiting, with no process"
    form = httpx.post(f"{api}/flow_runs/{runs['approved']}/input/filter",
                      json={"prefix": "suspended-approval-approved-v1", "limit": 10}, timeout=30).json()
    description = next(json.loads(item["value"]) for item in form if item["key"].endswith("-description"))
    assert description.startswith("### Promote approved v1 to `production`?") and "| accuracy |" in description

    for name, decision in (("approved", "approve"), ("rejected", "reject")):
        response = resume_run(api, runs[name], {"decision": decision, "comment": f"{name} by ana"})
        assert response.status_code in (200, 201) and response.json()["status"] == "ACCEPT", response.text
    finished = wait_finished(api, list(runs.values()), timeout=300)
    assert {name: finished[run_id]["state_type"] for name, run_id in runs.items()} == \
        {"approved": "COMPLETED", "rejected": "COMPLETED"}

    registry = Registry(root / "runs" / "registry")
    assert registry.index("approved").aliases == {"production": 1}
    assert "production" not in registry.index("rejected").aliases
    results = {name: json.loads((root / "runs" / name / "result.json").read_text()) for name in runs}
    assert results["approved"]["promotion"]["reason"].endswith("; approved (approved by ana)")
    assert results["rejected"]["promotion"]["reason"].endswith("; rejected (rejected by ana)")
    assert results["rejected"]["promotion"]["approval"]["approved"] is False
    assert all(result["cached"]["train"] for result in results.values()), "the resumed run trained nothing again"
    trainings = [ancestors(api, run)[-1] for run in training_runs(api).values()]
    assert {name: trainings.count(run_id) for name, run_id in runs.items()} == {"approved": 1, "rejected": 1}
