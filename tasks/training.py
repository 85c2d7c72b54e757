"""The training task: one LoRA run on leased devices, in its own torchrun process tree, with
live progress in the Prefect UI, that stops at a checkpoint when its flow run is cancelled.

Two kinds of slot, for two questions. The global concurrency limit (`gpu`, one slot per
device) says how many devices a whole pool of workers may use at once; it is a count. The
host's device leases (`loraflow.devices`) say *which* devices this training uses; the child
process sees only those.

Crash safety of the global slot: Prefect frees a slot whose holder died only when its lease expires,
and only on a server that runs the lease repossessor; the temporary server of a bare
`python flows/single.py` runs none and forgets leases when it exits, so a killed run would
block every later run on that slot for good. Each holder therefore leaves a note under
PREFECT_HOME; the next run on the same host gives back the slots of holders that are dead.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.concurrency.context import ConcurrencyContext
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, PREFECT_HOME
from prefect.states import Cancelled, Cancelling, State

from loraflow.devices import host_devices
from loraflow.errors import ConfigError, TrainingStopped
from loraflow.layout import atomic_write_json, lock_run_folder
from loraflow.pipeline import train, train_key
from loraflow.plan import ResolvedConfig
from loraflow.train.launch import LaunchOptions
from loraflow.train.request import ProgressUpdate, TrainRequest, TrainResult
from loraflow.train.worker import process_alive
from tasks.interrupts import interrupted, record_stopped_training, training_in_progress
from tasks.policies import transient_retries

SLOT_LEASE_SECONDS = 60  # the shortest lease a server accepts: a dead holder's slot is repossessed soonest
SLOT_POLL_SECONDS = 2  # how long one attempt at the slots waits before the run checks for a cancel


def ensure_concurrency_limit(name: str) -> int:
    """The global limit's slots, creating it when missing with one slot per device of this host.
    Prefect silently skips a missing limit unless `strict=True`, so loraflow creates it rather
    than run unthrottled; an existing limit keeps the slot count its owner gave it."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            slots = len(host_devices().ids)
            client.upsert_global_concurrency_limit_by_name(name, slots)
            get_run_logger().info(f"created global concurrency limit {name!r} with {slots} slot(s), one per device")
            return slots


def _holders_dir() -> Path:
    return Path(PREFECT_HOME.value()) / "loraflow-slot-holders"


def reclaim_dead_holders(limit: str) -> None:
    """Give back the slots of `limit` still held by processes on this host that were killed.

    With a configured server the lease is released (a no-op if it was already repossessed,
    so never counted twice); a temporary server has lost the lease, so one slot is decremented.
    """
    host = socket.gethostname()
    for note in sorted(_holders_dir().glob("*.json")):
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


def slot_holders(limit: str) -> list[str]:
    """Who holds slots of `limit`, as their notes say: `run 'reviews' (pid 12 on gpu-3, since 10:04:05)`."""
    found = []
    for note in sorted(_holders_dir().glob("*.json")):
        try:
            holder = json.loads(note.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if holder.get("limit") == limit:
            since = time.strftime("%H:%M:%S", time.localtime(float(holder.get("since", 0))))
            found.append(f"run {holder.get('run') or '?'!r} (pid {holder.get('pid')} on {holder.get('host')}, "
                         f"since {since})")
    return found


@contextmanager
def _acquire_slots(limit: str, devices: int, run: str, log: Callable[[str], None],
                   should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """Prefect's `concurrency`, asked for a few seconds at a time so that a cancel (or Ctrl-C) ends
    the wait at once; the first failed attempt says who holds the slots, once."""
    told = False
    while True:
        slots = ExitStack()
        try:
            slots.enter_context(concurrency(limit, occupy=devices, strict=True, lease_duration=SLOT_LEASE_SECONDS,
                                            timeout_seconds=SLOT_POLL_SECONDS))
        except TimeoutError:
            if not told:
                held = "; ".join(slot_holders(limit)) or "holders unknown (another host, or a run without notes)"
                log(f"waiting for {devices} slot(s) of the global concurrency limit {limit!r}, held by: {held}")
                told = True
            if should_stop is not None and should_stop():
                raise TrainingStopped(f"{run}: cancelled while waiting for a {limit!r} slot; nothing was trained")
            reclaim_dead_holders(limit)  # a holder that died while we waited
            continue
        break
    with slots:  # gives the slots back on the way out; raises if that fails
        yield


@contextmanager
def training_slots(limit: str, devices: int, run: str = "?", log: Callable[[str], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> Iterator[None]:
    """Hold one slot of the global limit `limit` per device while training.

    Waits (saying so once, with who holds them) while the slots are taken, after giving back those
    of dead holders, and gives up with `TrainingStopped` when `should_stop` says the run was
    cancelled. The holder's note is removed only once the slots were given back: when that fails
    (the server is gone), the note stays and the next run on this host gives them back.
    """
    log = log or get_run_logger().info
    slots = ensure_concurrency_limit(limit)
    if devices > slots:
        raise ConfigError(
            f"devices: {devices} devices need as many slots of the global concurrency limit {limit!r}, which has "
            f"{slots}; raise it (`prefect gcl update {limit} --limit {devices}`) or lower devices"
        )
    reclaim_dead_holders(limit)
    held = ExitStack()
    held.enter_context(_acquire_slots(limit, devices, run, log, should_stop))
    context = ConcurrencyContext.get()  # records each lease it grants, newest last
    lease_id = str(context.cleanup_lease_ids[-1]) if context and context.cleanup_lease_ids else None
    note = _holders_dir() / f"{lease_id or os.getpid()}.json"
    holder = {"limit": limit, "run": run, "host": socket.gethostname(), "pid": os.getpid(), "lease_id": lease_id,
              "since": time.time(), "slots": devices}
    try:
        atomic_write_json(note, holder)
        yield
    finally:
        try:
            held.close()
        except Exception as error:  # noqa: BLE001 - the training's own outcome is what the run reports
            log(f"warning: could not give back the {limit!r} slot ({type(error).__name__}: {error}); {note} "
                "stays, and the next run on this host gives the slot back")
        else:
            note.unlink(missing_ok=True)


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
        if interrupted():  # Ctrl-C, SIGTERM, or the temporary server gone (tasks/interrupts.py)
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


def _note_on_cancelling_run(run_id: str | None, message: str) -> None:
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


class TrainingProgress:
    """Forwards trainer progress to the run logs and to a progress artifact in the UI."""

    def __init__(self, name: str):
        self.logger = get_run_logger()
        self.artifact_id = create_progress_artifact(progress=0.0, description=f"Training LoRA adapter for {name}")

    def __call__(self, update: ProgressUpdate) -> None:
        if interrupted():  # stopping; the server may be gone, and each try would hold up the stop by seconds
            return
        percent = 100.0 * update.step / max(1, update.max_steps)
        try:
            update_progress_artifact(self.artifact_id, progress=min(100.0, percent))
        except (httpx.HTTPError, OSError):  # the UI's progress bar is not worth a training: the server may be gone
            pass


@task(name="train-lora", cache_key_fn=lambda context, parameters: train_key(parameters), **transient_retries())
def train_adapter_task(
    config: ResolvedConfig, request: TrainRequest, concurrency_limit: str, launch: LaunchOptions | None = None
) -> TrainResult:
    """Train the adapter in a torchrun process tree on leased devices of this host (one rank per
    device, `config.processes` in all), holding one slot of the global `concurrency_limit` per device.

    Cached on the resolved config's fingerprint (dataset, settings, base model, code), so an
    identical re-run reuses the adapter. A retry (a transient failure: the child was killed, ran
    out of memory at batch size 1, or hung) resumes from the last complete checkpoint instead of
    step 0; configuration errors are never retried.
    """
    launch = (launch or LaunchOptions()).with_rendezvous(run_id=flow_run.get_root_flow_run_id() or flow_run.get_id())
    logger = get_run_logger()
    watch = CancellationWatch()
    with training_slots(concurrency_limit, config.processes // launch.nnodes, run=flow_run.get_name() or config.name,
                        log=logger.info, should_stop=watch):
        try:
            with training_in_progress(request.checkpoint_dir):
                return train(config, request, launch, log=logger.info, on_progress=TrainingProgress(config.name),
                             should_stop=watch)
        except TrainingStopped as stopped:
            logger.warning(str(stopped))
            record_stopped_training(str(stopped))
            _note_on_cancelling_run(watch.cancelled_run_id, str(stopped))
            raise
