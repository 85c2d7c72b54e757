"""Stopping a run: Ctrl-C, SIGTERM, a temporary server that goes away, and a cancel from the UI.

Prefect's own handling of these leaves runs hanging or `Cancelling` for good in a bare
`python flows/x.py`; the workarounds live here, together.

A terminal's Ctrl-C sends SIGINT to its whole foreground process group. Prefect starts the
temporary server of a bare `python flows/x.py` (no PREFECT_API_URL) on the first API call, as a
child in that group, so Ctrl-C used to kill the server first and leave the run retrying its
API calls for minutes. `TerminalSession` therefore:

- starts the temporary server itself, before the flow, in a session of its own (Prefect's own
  `SubprocessASGIServer`, which the run's clients then find and reuse), and stops it on the way out;
- runs the flow in a thread, so that the main thread only waits and handles signals (Prefect's
  engine installs its SIGTERM handler only in the main thread);
- on the first SIGINT/SIGTERM asks everything to stop (`interrupt`): training saves a checkpoint
  and stops, waits for slots, devices and folders give up, no new stage starts, and the flow runs
  end Cancelled with the reason; a second signal, or a run that has not stopped by the deadline,
  ends the process at once (the training tree goes with it; its last complete checkpoint stays);
- watches the server (the temporary one, or the one PREFECT_API_URL names): if it dies or stops
  answering, training stops at a checkpoint and the run ends within a bounded time with one line
  naming the server and what was saved, instead of retrying its API calls for minutes.

A temporary server costs 8-16 s per run on a small machine, a third of a fully cached re-run. So
when a Prefect server already answers at the default local address (`prefect server start
--background`), the run uses it instead and says so (LORAFLOW_USE_RUNNING_SERVER=0 turns this off).

A slot of the `gpu` limit whose holder died: Prefect frees it only when its lease expires, and
only on a server that runs the lease repossessor; the temporary server of a bare run runs none and
forgets leases when it exits, so a killed run would block every later run on that slot for good.
Each holder leaves a note (`orchestration.slots`); `reclaim_dead_holders` gives back the slots of
this host's dead holders before a run waits.

A cancel from the UI or the API: training asks the server whether its run (or the run it belongs
to) is cancelling (`CancellationWatch`), and the process that started a run without a worker moves
it on from Cancelling to Cancelled (`finish_cancellation`), as a worker would.
"""

from __future__ import annotations

import contextvars
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import prefect
from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.context import refresh_global_settings_context
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_HOME,
    PREFECT_SERVER_EPHEMERAL_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    get_current_settings,
)
from prefect.states import Cancelled, Cancelling, State

from loraflow.errors import TrainingStopped
from loraflow.layout import lock_run_folder
from loraflow.model_process import stop_model_processes
from loraflow.train.checkpoints import find_resumable_checkpoint
from loraflow.train.launch import LaunchOptions, end_all_trainings, request_stop_all, trainings_running
from loraflow.train.worker import process_alive

# How long a stopping run may take before the process ends anyway: the training's own grace to
# save its checkpoint, and time to set the flow runs' states.
STOP_DEADLINE_S = LaunchOptions().stop_grace_s + 30
SERVER_CHECK_S = 5.0  # how often the server is asked for its health
SERVER_CHECK_TIMEOUT_S = 3.0  # how long one health check waits for an answer
SERVER_FAILURES = 3  # unanswered health checks in a row that count as the server gone
# A run whose server stopped answering ends within SERVER_LOST_BOUND_S: noticed after at most
# SERVER_FAILURES checks (each up to half a second late, the last one waiting its full timeout),
# then time for training to save its checkpoint, then the exit (`run`'s last 3 s wait for the
# flow thread, the resource tracker's 3 s, the kills).
SERVER_LOST_BOUND_S = 60.0
_SERVER_NOTICED_S = SERVER_FAILURES * (SERVER_CHECK_S + 0.5) + SERVER_CHECK_TIMEOUT_S  # 19.5 s
_EXIT_S = 3 + 3 + 1.5
SERVER_LOST_DEADLINE_S = SERVER_LOST_BOUND_S - _SERVER_NOTICED_S - _EXIT_S  # 33 s for training to save its checkpoint
SERVER_STARTUP_S = 120  # the longest a temporary server may take to answer before the run gives up
CLIENT_MAX_RETRIES = "2"  # an API call retries 2 s + 4 s, not Prefect's default 2+4+8+16+32 s
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
LOCAL_SERVER_URL = "http://127.0.0.1:4200/api"  # where `prefect server start` listens by default

_STOP = threading.Event()
_REASON: list[str] = []
_STOPPED_TRAININGS: list[str] = []
_ACTIVE_TRAININGS = [0]
_UNFINISHED_TRAININGS: list[str] = []
_WAITING_FOR_A_PERSON = [0]
_GUARD = threading.Lock()


def interrupt(reason: str) -> None:
    """Ask this whole process to stop: trainings save a checkpoint and stop, waits give up,
    no stage starts. The first reason is the one reported."""
    with _GUARD:
        if not _REASON:
            _REASON.append(reason)
    _STOP.set()
    request_stop_all()


def interrupted() -> str | None:
    """Why this process was asked to stop, or None."""
    return _REASON[0] if _STOP.is_set() else None


def record_stopped_training(message: str) -> None:
    """What a training that stopped on request saved (its `TrainingStopped` message), for the last line."""
    with _GUARD:
        _STOPPED_TRAININGS.append(message)


@contextmanager
def waiting_for_a_person() -> Iterator[None]:
    """Marks a wait that holds nothing (a paused run asking for approval): Ctrl-C or SIGTERM then
    ends the process at once instead of waiting out the stop deadline, since Prefect's pause polls
    in its own sleep loop and would not notice the stop."""
    with _GUARD:
        _WAITING_FOR_A_PERSON[0] += 1
    try:
        yield
    finally:
        with _GUARD:
            _WAITING_FOR_A_PERSON[0] -= 1


class training_in_progress:
    """Counts trainings in flight, so that a run whose server is gone waits for them to stop and no
    longer; remembers those that ended otherwise than finished or stopped, to say what they left."""

    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = checkpoint_dir

    def __enter__(self) -> None:
        with _GUARD:
            _ACTIVE_TRAININGS[0] += 1
            _UNFINISHED_TRAININGS.append(self.checkpoint_dir)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        with _GUARD:
            _ACTIVE_TRAININGS[0] -= 1
            if exc_type is None or issubclass(exc_type, TrainingStopped):  # finished, or said what it saved
                _UNFINISHED_TRAININGS.remove(self.checkpoint_dir)


def what_was_saved() -> str:
    """The checkpoints the trainings of this process left, for the last line of an interrupted run."""
    with _GUARD:
        said = list(_STOPPED_TRAININGS)
        unfinished = list(_UNFINISHED_TRAININGS)
    for checkpoint_dir in unfinished:
        found = find_resumable_checkpoint(checkpoint_dir, log=lambda message: None)
        said.append(f"training ended with {Path(found).name} saved in {checkpoint_dir}: run again to resume" if found
                    else f"training ended before its first checkpoint in {checkpoint_dir}")
    return "; ".join(said) or "no training was in progress; finished stages are cached, so a re-run goes on from there"


def shielded_server() -> Any:
    """Prefect's temporary server, started in a session of its own: a terminal's Ctrl-C (sent to
    the foreground process group) no longer reaches it. Registered where Prefect looks for it
    (`SubprocessASGIServer()` returns this instance), so every client of the run uses it.
    (Imported here: the server module costs a second to import, and a configured server needs none.)"""
    from prefect.server.api.server import SubprocessASGIServer

    class ShieldedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect 3.8.8's own command line and environment, plus start_new_session.
            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            return subprocess.Popen(
                args=[sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                      "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                      "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **server_env, **get_current_settings().to_environment_variables(exclude_unset=True)},
                start_new_session=True,
            )

        def kill(self) -> None:
            if self.server_process is not None and self.server_process.poll() is None:
                self.server_process.kill()
            self.stop()

        def healthy(self) -> bool:
            if self.server_process is None or self.server_process.poll() is not None:
                return False
            try:
                return httpx.get(f"{self.api_url}/health", timeout=SERVER_CHECK_TIMEOUT_S).status_code == 200
            except httpx.HTTPError:
                return False

    existing = SubprocessASGIServer._instances.get(None)
    if existing is not None and existing.running:
        return None  # something in this process already started one; nothing left to shield
    SubprocessASGIServer._instances.pop(None, None)
    return ShieldedServer()


def _drain_api_workers(timeout: float = 5) -> None:
    """Send the run logs and events still queued, as Prefect's own test harness does before it stops its server."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception:  # noqa: BLE001 - a worker never started, or the server is already gone
            pass


def finish_interrupted_runs(top_run_id: Any, reason: str) -> None:
    """Set the top run (unless it completed) and every subflow run of it that has not finished (or
    crashed on the interrupt) to Cancelled with `reason`; subflow runs that completed, failed or
    were cancelled on their own keep their state."""
    with get_client(sync_client=True) as client:
        runs, parents = [client.read_flow_run(top_run_id)], [top_run_id]
        while parents:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=parents)))
            runs.extend(children)
            parents = [child.id for child in children]
        for run in runs:
            state = run.state
            if run.id == top_run_id:  # the run the user started says why it stopped and what was saved
                finish = state is None or not state.is_completed()
            else:
                finish = state is None or not state.is_final() or state.is_crashed()
            if finish:
                client.set_flow_run_state(run.id, Cancelled(message=reason), force=True)


def running_local_server() -> str | None:
    """The API address of a Prefect server answering at the default local address (or
    LORAFLOW_LOCAL_SERVER_URL), unless LORAFLOW_USE_RUNNING_SERVER=0."""
    if os.environ.get("LORAFLOW_USE_RUNNING_SERVER", "1") == "0":
        return None
    url = os.environ.get("LORAFLOW_LOCAL_SERVER_URL", LOCAL_SERVER_URL).rstrip("/")
    try:
        healthy = httpx.get(f"{url}/health", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return None
    return url if healthy else None


class TerminalSession:
    """Runs one flow call for `python flows/x.py`; see the module docstring."""

    def __init__(self, err: Callable[[str], None] | None = None):
        self.server: Any = None  # the shielded temporary server, when this run starts one
        self.api_url: str | None = None  # the server the run talks to, watched while it runs
        self.signal: int | None = None
        self.top_run_id: Any = None
        self.deadline: float | None = None
        self.server_lost: str | None = None
        self._lost_at = 0.0
        self._trees_gone_at = 0.0  # when, after the server was lost, no training process was left
        self._err = err or (lambda line: print(line, file=sys.stderr, flush=True))
        self._previous: dict[int, Any] = {}

    # -- set-up and tear-down ------------------------------------------------------------------
    def __enter__(self) -> "TerminalSession":
        if not PREFECT_API_URL.value() and (running := running_local_server()):
            os.environ["PREFECT_API_URL"] = running
            refresh_global_settings_context()
            self._err(f"using the Prefect server already running at {running} (UI: {running.removesuffix('/api')}); "
                      "LORAFLOW_USE_RUNNING_SERVER=0 starts a temporary one instead")
        if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", CLIENT_MAX_RETRIES)
            refresh_global_settings_context()
            self.server = shielded_server()
            if self.server is not None:
                # A fresh PREFECT_HOME migrates its database first: on a busy 2-core machine that outlasts
                # Prefect's default wait, and the run then fails on its first API call.
                self.server.start(timeout=max(SERVER_STARTUP_S,
                                              PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        self.api_url = self.server.api_url if self.server is not None else PREFECT_API_URL.value()
        for signum in EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self.server is not None:
            if self.server_lost is None:  # a lost server takes no more: draining would only wait out the timeouts
                _drain_api_workers()  # logs and events still queued would go to a server that is gone
            self.server.stop()

    # -- running -------------------------------------------------------------------------------
    def run(self, flow: Any, params: Any) -> State:
        """`flow(params, return_state=True)` in a thread; returns its state, or raises what it raised."""
        outcome: dict[str, Any] = {}

        def record_run(flow_: Any, flow_run: Any, state: State) -> None:
            self.top_run_id = flow_run.id

        def target() -> None:
            try:
                outcome["state"] = flow.with_options(on_running=[record_run])(params, return_state=True)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                outcome["error"] = error

        thread = threading.Thread(target=contextvars.copy_context().run, args=(target,), name="flow", daemon=True)
        thread.start()
        last_check, failures = time.monotonic(), 0
        while thread.is_alive():
            thread.join(0.5)
            now = time.monotonic()
            if self.api_url and self.server_lost is None and now - last_check >= SERVER_CHECK_S:
                last_check = now
                failures = 0 if self._server_answers() else failures + 1
                if failures >= SERVER_FAILURES or self._server_process_gone():
                    self._lose_server(now)
            if self.server_lost is not None and thread.is_alive() and now > self._lost_at + 3:
                with _GUARD:
                    training = _ACTIVE_TRAININGS[0]
                # Also done a few seconds after the last training process ended (time for its task to say
                # what it saved): the task may be stuck in an API call (its progress bar) that retries
                # against the lost server long after its processes stopped.
                if training and not self._trees_gone_at and not trainings_running():
                    self._trees_gone_at = now
                if training == 0 or now > self.deadline or (self._trees_gone_at and now > self._trees_gone_at + 5):
                    thread.join(3)  # what the flow still has to say, if it can
                    if thread.is_alive():
                        self.exit_now(f"error: {self.server_lost}; {what_was_saved()}", 1, set_states=False)
            asked_to_stop_while_waiting = self.signal is not None and _WAITING_FOR_A_PERSON[0]
            if self.deadline is not None and thread.is_alive() and (now > self.deadline or asked_to_stop_while_waiting):
                self.exit_now(self.stopped_line(), self.exit_code())
        if "error" in outcome:
            raise outcome["error"]
        return outcome["state"]

    def _server_answers(self) -> bool:
        if self.server is not None:
            return self.server.healthy()
        try:
            return httpx.get(f"{self.api_url.rstrip('/')}/health", timeout=SERVER_CHECK_TIMEOUT_S).status_code == 200
        except httpx.HTTPError:
            return False

    def _server_process_gone(self) -> bool:
        """The temporary server's process ended (a configured server's process is not ours to see)."""
        return self.server is not None and (self.server.server_process is None
                                            or self.server.server_process.poll() is not None)

    def _lose_server(self, now: float) -> None:
        self.server_lost = f"the Prefect server at {self.api_url.rstrip('/').removesuffix('/api')} stopped responding"
        self._lost_at, self.deadline = now, now + SERVER_LOST_DEADLINE_S
        self._err(f"{self.server_lost}: stopping training at a checkpoint")
        os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"  # the run's logs have nowhere to go now
        refresh_global_settings_context()
        interrupt(self.server_lost)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is not None or self.server_lost is not None:
            self.exit_now(self.stopped_line(signum, at_once=True), EXIT_CODES[signal.Signals(signum)],
                          set_states=self.server_lost is None)
        self.signal = signum
        interrupt(f"interrupted by {self.signal_name(signum)}")
        self.deadline = time.monotonic() + STOP_DEADLINE_S
        self._err(f"{self.signal_name(signum)}: stopping at the next checkpoint; press Ctrl-C again to quit at once")

    # -- reporting -----------------------------------------------------------------------------
    @staticmethod
    def signal_name(signum: int) -> str:
        return "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name

    def reason(self) -> str:
        return interrupted() or "stopped"

    def stopped_line(self, signum: int | None = None, at_once: bool = False) -> str:
        if at_once:
            return (f"stopped: {self.reason()}, then {self.signal_name(signum)} again: quit at once; the last "
                    "complete checkpoint and finished stages are kept, run again to resume")
        return f"stopped: {self.reason()}; {what_was_saved()}"

    def exit_code(self) -> int:
        return EXIT_CODES[signal.Signals(self.signal)] if self.signal is not None else 1

    def finish_runs(self, timeout: float = 10) -> None:
        """Cancelled states for the interrupted run tree, given at most `timeout` seconds."""
        if self.top_run_id is None:
            return
        done = threading.Thread(target=self._finish_runs, daemon=True)
        done.start()
        done.join(timeout)

    def _finish_runs(self) -> None:
        try:
            finish_interrupted_runs(self.top_run_id, f"{self.reason()}; {what_was_saved()}")
        except Exception:  # noqa: BLE001 - the server may be gone; the line still says what happened
            pass

    def exit_now(self, line: str, code: int, set_states: bool = True) -> None:
        """End the process now: trainings and model processes, flow run states (briefly), the server, one line."""
        end_all_trainings()  # killed, not asked: the last complete checkpoint stays
        stop_model_processes()
        for child in multiprocessing.active_children():  # a Dask cluster's processes, if any
            child.kill()
        if set_states:
            self.finish_runs(timeout=5)
        if self.server is not None:
            self.server.kill()
        _stop_resource_tracker()  # it would warn about the killed processes' semaphores after the last line
        self._err(line)
        os._exit(code)


def _stop_resource_tracker(timeout: float = 3) -> None:
    """Let multiprocessing's resource tracker clean up now: it does so, and says so, when the last
    process holding its pipe is gone."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    fd, pid = getattr(tracker, "_fd", None), getattr(tracker, "_pid", None)
    if fd is None or pid is None:
        return
    try:
        os.close(fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
            time.sleep(0.05)
    except OSError:
        pass


class CancellationWatch:
    """`should_stop` for the trainer: has someone cancelled this flow run, or the run it belongs to?

    A run started by a worker is also stopped by the worker killing its process; a run started
    with `python flows/x.py` has no one to do that, so training asks the server itself. Training
    may run in a subflow (or a dispatched deployment run) while the user cancels the parent.
    """

    def __init__(self):
        ids = (flow_run.get_id(), flow_run.get_parent_flow_run_id(), flow_run.get_root_flow_run_id())
        self.flow_run_ids = list(dict.fromkeys(str(i) for i in ids if i))
        self.cancelled_run_id: str | None = None

    def __call__(self) -> bool:
        if interrupted():  # Ctrl-C, SIGTERM, or the temporary server gone (orchestration/prefect_workarounds.py)
            return True
        try:
            with get_client(sync_client=True) as client:
                states = {run_id: client.read_flow_run(run_id).state for run_id in self.flow_run_ids}
        except (httpx.HTTPError, ObjectNotFound):  # an unreachable server must not stop training; ask again later
            return False
        for run_id, state in states.items():
            if state is not None and (state.is_cancelling() or state.is_cancelled()):
                self.cancelled_run_id = run_id
                return True
        return False


def note_on_cancelling_run(run_id: str | None, message: str) -> None:
    """Put why and where training stopped on the cancelled run's state, for the UI and `finish_cancellation`."""
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        if client.read_flow_run(run_id).state.is_cancelling():
            client.set_flow_run_state(run_id, Cancelling(message=message), force=True)


def finish_cancellation(state: State) -> State:
    """Move a run that stopped on a cancel request from Cancelling to Cancelled.

    The server accepts nothing but Cancelled after Cancelling, and Prefect's engine proposes
    Failed for a flow whose task raised, so a run started without a worker would stay
    Cancelling for good; the process that started it finishes the cancellation, as a worker would.
    """
    if not state.is_cancelling():
        return state
    cancelled = Cancelled(message=state.message or "cancelled on request")
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(state.state_details.flow_run_id, cancelled)
    return cancelled


def hold_run_folder(root: str | Path, run: str):
    """`lock_run_folder` for a flow: waits are logged to the run, and a cancel or Ctrl-C ends them."""
    return lock_run_folder(root, run, log=get_run_logger().info, should_stop=CancellationWatch())


def slot_holders_dir() -> Path:
    """Where each holder of a global-concurrency slot leaves its note (`orchestration.slots`)."""
    return Path(PREFECT_HOME.value()) / "loraflow-slot-holders"


def reclaim_dead_holders(limit: str) -> None:
    """Give back the slots of `limit` still held by processes on this host that were killed.

    With a configured server the lease is released (a no-op if it was already repossessed,
    so never counted twice); a temporary server has lost the lease, so one slot is decremented.
    """
    host = socket.gethostname()
    for note in sorted(slot_holders_dir().glob("*.json")):
        try:
            holder = json.loads(note.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if holder.get("limit") != limit or holder.get("host") != host or process_alive(int(holder["pid"])):
            continue
        claimed = note.with_suffix(f".reclaiming-{os.getpid()}")
        try:
            os.replace(note, claimed)  # one reclaimer per note, even when runs start together
        except FileNotFoundError:
            continue
        try:
            with get_client(sync_client=True) as client:
                if PREFECT_API_URL.value() and holder.get("lease_id"):
                    client.release_concurrency_slots_with_lease(lease_id=holder["lease_id"])
                else:
                    held = max(0.001, time.time() - float(holder.get("since", 0)))  # the server wants > 0
                    client.release_concurrency_slots(names=[limit], slots=int(holder.get("slots", 1)),
                                                     occupancy_seconds=held)
        except BaseException:
            os.replace(claimed, note)  # still held: the next run tries again
            raise
        claimed.unlink(missing_ok=True)
        get_run_logger().warning(f"released the {limit!r} slot of process {holder['pid']}, which died holding it")
