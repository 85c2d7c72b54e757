"""A real Prefect stack for the tests, started the way a user starts one: `prefect server start`
(on SQLite, or on PostgreSQL through a proxy the tests can cut), `python deployments/setup.py`,
and process workers for both pools, all in a temp dir of their own and torn down at the end,
also when a test fails.

PostgreSQL is the machine's own (`LORAFLOW_TEST_POSTGRES`, default `postgresql://postgres@127.0.0.1:5432`);
each stack gets a fresh database, dropped afterwards, so runs never see another session's rows.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SETUP = [sys.executable, str(REPO / "deployments" / "setup.py")]
POSTGRES = os.environ.get("LORAFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
# Flow runs of the workers send a heartbeat every 30 s (Prefect's minimum); the set-up's automation
# marks a run Crashed after `ZOMBIE_AFTER_S` without one.
HEARTBEAT_S, ZOMBIE_AFTER_S = 30, 75
# What the README tells users to start workers with (their flow runs inherit it). Prefect 3.8.8's
# server answers 500, not 503, while PostgreSQL refuses connections (a ConnectionRefusedError is
# not among its retryable errors), and its clients retry only 429, 502 and 503 by default.
WORKER_ENV = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S), "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500"}


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
    """Long-running subprocesses by name, each in its own session so stopping one stops its children;
    a sampler thread keeps each one's peak memory and CPU seconds (its whole process tree)."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs, self.env, self.running = logs, env, {}
        self.peak_rss: dict[str, int] = {}
        self.cpu_s: dict[str, float] = {}
        self._sampling = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen(args, cwd=REPO, env={**self.env, **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.running[name] = (process, log, args, env)
        return process

    def kill(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Signal `name`'s process group; a SIGTERM not obeyed in 20 s becomes a SIGKILL."""
        process, log, _, _ = self.running[name]
        if process.poll() is None:
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()

    def lose(self, name: str) -> None:
        """SIGKILL `name` and every process under it, also those in sessions of their own (Prefect starts
        each flow run in one): a lost machine, where nothing is left to report."""
        process, log, _, _ = self.running[name]
        for doomed in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
            try:
                doomed.kill()
            except psutil.NoSuchProcess:
                pass
        process.wait(timeout=20)
        log.close()

    def restart(self, name: str) -> subprocess.Popen:
        _, _, args, env = self.running[name]
        return self.start(name, *args, env=env)

    def stop_all(self) -> None:
        """Last started first: workers (and their flow runs) before the server they report to."""
        self._sampling.set()
        for name in reversed(list(self.running)):
            self.kill(name)

    def tail(self, name: str, lines: int = 30) -> str:
        return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])

    def _sample(self) -> None:
        while not self._sampling.wait(0.5):
            for name, (process, *_) in list(self.running.items()):
                try:
                    root = psutil.Process(process.pid)
                    tree = [root, *root.children(recursive=True)]
                    rss = sum(p.memory_info().rss for p in tree)
                    cpu = sum(sum(p.cpu_times()[:4]) for p in tree)  # own, and of children that ended
                except psutil.Error:
                    continue
                self.peak_rss[name] = max(self.peak_rss.get(name, 0), rss)
                self.cpu_s[name] = max(self.cpu_s.get(name, 0.0), cpu)


def healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def deployment_id(api: str, name: str) -> str:
    response = httpx.get(f"{api}/deployments/name/{name}", timeout=10)
    response.raise_for_status()
    return response.json()["id"]


def flow_runs(api: str, **filters: Any) -> list[dict]:
    response = httpx.post(f"{api}/flow_runs/filter", json=filters, timeout=30)
    response.raise_for_status()
    return response.json()


def ancestors(api: str, run: dict) -> list[str]:
    """Ids of the flow runs `run` is nested in, innermost first (subflows link via a parent task run)."""
    ids = []
    while run.get("parent_task_run_id"):
        parent_task = httpx.get(f"{api}/task_runs/{run['parent_task_run_id']}", timeout=10).json()
        run = httpx.get(f"{api}/flow_runs/{parent_task['flow_run_id']}", timeout=10).json()
        ids.append(run["id"])
    return ids


def create_run(api: str, deployment: str, params: dict[str, Any]) -> str:
    """What any scheduler or CI job does: one REST call, retried on 503 as Prefect's own client does
    (a SQLite server answers it while its database is locked); the run's id."""
    url = f"{api}/deployments/{deployment_id(api, deployment)}/create_flow_run"
    for delay in (1, 2, 4, 8, 0):
        response = httpx.post(url, json={"parameters": {"params": params}}, timeout=30)
        if response.status_code != 503 or not delay:
            break
        time.sleep(delay)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def resume_run(api: str, run_id: str, run_input: dict[str, str]) -> httpx.Response:
    """The answer as any client sends it, retried on 503 as Prefect's own client does (a SQLite server
    answers it while its database is locked, as under this suite's load it was)."""
    for delay in (1, 2, 4, 8, 0):
        response = httpx.post(f"{api}/flow_runs/{run_id}/resume", json={"run_input": run_input}, timeout=30)
        if response.status_code != 503 or not delay:
            return response
        time.sleep(delay)
    return response


def wait_finished(api: str, run_ids: list[str], timeout: float) -> dict[str, dict]:
    """Every run of `run_ids` in a terminal state (bounded), by id."""
    def finished() -> dict[str, dict] | None:
        runs = {run["id"]: run for run in flow_runs(api, flow_runs={"id": {"any_": run_ids}})}
        return runs if all(run["state_type"] in TERMINAL for run in runs.values()) else None

    return wait_for(f"{len(run_ids)} flow run(s) to finish", finished, timeout=timeout, interval=3)


def training_runs(api: str) -> dict[str, dict]:
    """Every flow run of the training deployment so far, by name (`train-<run>`), newest last."""
    runs = flow_runs(api, deployments={"id": {"any_": [deployment_id(api, "train/gpu")]}}, sort="EXPECTED_START_TIME_ASC")
    return {run["name"]: run for run in runs}


def load_figures(api: str, pipelines: list[str], wall_s: float, processes: Processes) -> dict[str, Any]:
    """What a burst of `pipelines` (top-level run ids) cost: trainings per minute of wall time, seconds
    from a pipeline's creation to the start of each of its trainings (p50, p95), peak memory and CPU."""
    created = {run["id"]: run["created"] for run in flow_runs(api, flow_runs={"id": {"any_": pipelines}})}
    waits = sorted(
        (datetime.fromisoformat(run["start_time"]) - datetime.fromisoformat(created[ancestors(api, run)[-1]])).total_seconds()
        for run in training_runs(api).values()
        if run["start_time"] and ancestors(api, run)[-1] in created
    )
    return {
        "trainings": len(waits), "wall_s": round(wall_s, 1), "runs_per_minute": round(len(waits) / (wall_s / 60), 2),
        "creation_to_training_start_s": {"p50": round(statistics.median(waits), 1),
                                         "p95": round(waits[min(len(waits) - 1, int(0.95 * len(waits)))], 1)},
        "peak_rss_mib": {name: rss // 2**20 for name, rss in processes.peak_rss.items()},
        "cpu_s": {name: round(cpu, 1) for name, cpu in processes.cpu_s.items()},
    }


@contextmanager
def prefect_stack(root: Path, server_env: dict[str, str] | None = None,
                  workers: dict[str, tuple[str, dict[str, str]]] | None = None,
                  setup_args: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Server, set-up and `workers` (name -> (pool, extra env)); one worker per pool by default."""
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(root / "prefect-home" / "results"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "LORAFLOW_DEVICE_LOCKS": str(root / "device-locks"),
    }
    workers = workers or {f"worker-{pool}": (pool, {}) for pool in ("loraflow-cpu", "loraflow-gpu")}
    processes = Processes(root, env)
    try:
        host, port = api.removeprefix("http://").removesuffix("/api").split(":")
        server = processes.start("server", sys.executable, "-m", "prefect", "server", "start", "--host", host,
                                 "--port", port, env=server_env)
        wait_for("the server's /api/health", lambda: server.poll() is None and healthy(api), timeout=120)
        setup = subprocess.run(SETUP + ["--storage", str(root / "storage"), *setup_args], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=180)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        for name, (pool, extra) in workers.items():
            # Device locks per worker: each stands for a machine of its own, with devices of its own.
            locks = {"LORAFLOW_DEVICE_LOCKS": str(root / "device-locks" / name)}
            processes.start(name, sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                            "--name", name, env={**locks, **extra})
        yield {"api": api, "env": env, "root": root, "processes": processes}
    finally:
        processes.stop_all()


def _postgres(statement: str) -> None:
    async def run() -> None:
        import asyncpg

        connection = await asyncpg.connect(f"{POSTGRES}/postgres", timeout=10)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL, dropped afterwards; skips when none answers."""
    name = f"loraflow_test_{uuid.uuid4().hex[:12]}"
    try:
        _postgres(f"CREATE DATABASE {name}")
    except (OSError, asyncio.TimeoutError) as error:
        pytest.skip(f"no PostgreSQL at {POSTGRES} ({error}); `.ci/run` installs and starts one")
    try:
        yield name
    finally:
        _postgres(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class OutageProxy:
    """A TCP proxy from a loopback port to PostgreSQL. `outage(seconds)` drops every connection
    through it and refuses new ones for that long, which is what the server sees when PostgreSQL
    restarts or the network blips, without touching the machine's shared PostgreSQL."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.port = target, free_port()
        self._pairs: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._listen()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: an outage or the end
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with self._lock:
                self._pairs.discard(end)
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def _cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
        for end in pairs:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def outage(self, seconds: float) -> None:
        self._cut()
        time.sleep(seconds)
        self._listen()

    def close(self) -> None:
        self._cut()


@contextmanager
def postgres_stack(root: Path, workers: dict[str, tuple[str, dict[str, str]]],
                   setup_args: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """`prefect_stack` on a fresh PostgreSQL database, reached through an `OutageProxy`."""
    host, _, port = POSTGRES.rsplit("@", 1)[-1].partition(":")
    with postgres_database() as database:
        proxy = OutageProxy((host, int(port or 5432)))
        user = POSTGRES.removeprefix("postgresql://").rsplit("@", 1)[0]
        url = f"postgresql+asyncpg://{user}@127.0.0.1:{proxy.port}/{database}"
        try:
            with prefect_stack(root, {"PREFECT_API_DATABASE_CONNECTION_URL": url}, workers, setup_args) as stack:
                yield {**stack, "proxy": proxy, "database": database}
        finally:
            proxy.close()


def production_stack(root: Path, database: str = "postgresql"):
    """The issue's production layout: a server on `database` (postgresql or sqlite), two CPU
    workers, one GPU worker with two device slots (CPU slots here), all with `WORKER_ENV`."""
    workers = {
        "cpu-1": ("loraflow-cpu", WORKER_ENV),
        "cpu-2": ("loraflow-cpu", WORKER_ENV),
        "gpu-1": ("loraflow-gpu", {**WORKER_ENV, "LORAFLOW_CPU_DEVICES": "2"}),
    }
    setup = ("--gpu-slots", "2", "--unresponsive-after", str(ZOMBIE_AFTER_S))
    if database == "sqlite":
        return prefect_stack(root, None, workers, setup)
    return postgres_stack(root, workers, setup)
