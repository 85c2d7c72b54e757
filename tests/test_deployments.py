"""loraflow as deployments, the way a user runs it: a real `prefect server` on a free loopback
port, `python deployments/setup.py`, one process worker per pool, and `single` started
through the REST API. Its training must run as a flow run of `train/gpu` on the GPU pool.

Every wait is bounded, and the server and workers (with their flow-run subprocesses) are
torn down also when a test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_flow_single import FAST_CLASSIFICATION, REPO, write_messy_csv
from tests.tiny_models import easy_classification_examples

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SETUP = [sys.executable, str(REPO / "deployments" / "setup.py")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


class Processes:
    """Long-running subprocesses, each in its own session so stopping one stops its children."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs, self.env, self.started = logs, env, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        process = subprocess.Popen(
            args, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started.append((name, process, log))
        return process

    def stop_all(self) -> None:
        """Last started first: workers (and their flow runs) before the server they report to."""
        for _, process, log in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            log.close()

    def tail(self, name: str, lines: int = 30) -> str:
        return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Server, set-up and one worker per pool, all in a temp dir of their own."""
    root = tmp_path_factory.mktemp("deployments")
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(root / "prefect-home" / "results"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    processes = Processes(root, env)
    try:
        host, port = api.removeprefix("http://").removesuffix("/api").split(":")
        server = processes.start("server", sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", port)
        wait_for("the server's /api/health", lambda: server.poll() is None and _healthy(api), timeout=120)
        setup = subprocess.run(SETUP + ["--storage", str(root / "storage")], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=180)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        for pool in ("loraflow-cpu", "loraflow-gpu"):
            processes.start(f"worker-{pool}", sys.executable, "-m", "prefect", "worker", "start", "--pool", pool)
        yield {"api": api, "env": env, "root": root, "processes": processes}
    finally:
        processes.stop_all()


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def deployment_id(api: str, name: str) -> str:
    response = httpx.get(f"{api}/deployments/name/{name}", timeout=10)
    response.raise_for_status()
    return response.json()["id"]


def ancestors(api: str, run: dict) -> list[str]:
    """Ids of the flow runs `run` is nested in, innermost first (subflows link via a parent task run)."""
    ids = []
    while run.get("parent_task_run_id"):
        parent_task = httpx.get(f"{api}/task_runs/{run['parent_task_run_id']}", timeout=10).json()
        run = httpx.get(f"{api}/flow_runs/{parent_task['flow_run_id']}", timeout=10).json()
        ids.append(run["id"])
    return ids


def flow_runs(api: str, **filters: Any) -> list[dict]:
    response = httpx.post(f"{api}/flow_runs/filter", json=filters, timeout=10)
    response.raise_for_status()
    return response.json()


@pytest.fixture(scope="module")
def single_run(stack) -> dict[str, Any]:
    """`single/loraflow` started with a plain REST call, waited for (bounded)."""
    api, root = stack["api"], stack["root"]
    data = write_messy_csv(root / "reviews.csv", easy_classification_examples(90, seed=1))
    params = {"dataset": {"path": str(data)}, "overrides": FAST_CLASSIFICATION, "gates": {"accuracy": 0.8},
              "output_dir": str(root / "runs"), "shard_size": 40}
    response = httpx.post(f"{api}/deployments/{deployment_id(api, 'single/loraflow')}/create_flow_run",
                          json={"parameters": {"params": params}}, timeout=10)
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]

    def finished() -> dict | None:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
        return run if run["state_type"] in TERMINAL else None

    try:
        run = wait_for("single/loraflow to finish", finished, timeout=240, interval=2)
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
    automations = httpx.post(f"{api}/automations/filter", json={}).json()
    assert len(automations) == 1
