"""Slots of the global concurrency limit (`gpu`, one per device) that a training holds while it runs.

The limit says how many devices a whole pool of workers may use at once; it is a count. Which
devices a training uses is the host's business (`loraflow.devices`).

Each holder leaves a note under PREFECT_HOME (who, where, since when), which a waiting run shows
and from which the next run on the host gives back a dead holder's slots
(`orchestration.prefect_workarounds.reclaim_dead_holders`: the temporary server has no lease
recovery).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import httpx
from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.context import ConcurrencyContext
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from loraflow.devices import host_devices
from loraflow.errors import ConfigError, TrainingStopped
from loraflow.layout import atomic_write_json
from orchestration.prefect_workarounds import reclaim_dead_holders, slot_holders_dir

SLOT_LEASE_SECONDS = 60  # the shortest lease a server accepts: a dead holder's slot is repossessed soonest
SLOT_POLL_SECONDS = 2  # the pause between attempts at the slots, after which the run checks for a cancel


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


def slot_holders(limit: str) -> list[str]:
    """Who holds slots of `limit`, as their notes say: `run 'reviews' (pid 12 on gpu-3, since 10:04:05)`."""
    found = []
    for note in sorted(slot_holders_dir().glob("*.json")):
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
    """Prefect's `concurrency`, asked once per attempt (`max_retries=0`), so that a cancel (or
    Ctrl-C) between attempts ends the wait at once; the first refused attempt says who holds the
    slots, once. Not `timeout_seconds`: it abandons a request in flight, and a loaded server that
    grants the slots after the client gave up leaves them held by nobody until the lease ends."""
    told = False
    while True:
        slots = ExitStack()
        try:
            slots.enter_context(concurrency(limit, occupy=devices, strict=True, lease_duration=SLOT_LEASE_SECONDS,
                                            max_retries=0))
        except ConcurrencySlotAcquisitionError as refused:
            cause = refused.__cause__
            if not (isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423):
                raise  # not "the slots are taken": a missing limit, an unreachable server
            if not told:
                held = "; ".join(slot_holders(limit)) or "holders unknown (another host, or a run without notes)"
                log(f"waiting for {devices} slot(s) of the global concurrency limit {limit!r}, held by: {held}")
                told = True
            time.sleep(SLOT_POLL_SECONDS)
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
    note = slot_holders_dir() / f"{lease_id or os.getpid()}.json"
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
