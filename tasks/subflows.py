"""Run subflows side by side: a batch's datasets, a variations grid's variants.

Each subflow is called from inside a task on a thread pool. Prefect gives a subflow started
from a task its own run key, so concurrent siblings never collide, and each still shows in
the UI as its own flow run (named by the caller) under the parent. Everything overlaps: model
work runs in processes of its own (training in a torchrun tree, evaluation in a model process
per device), so siblings train side by side on the devices they lease.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from loraflow.devices import host_devices
from orchestration.prefect_workarounds import interrupted
from orchestration.slots import ensure_concurrency_limit


@task(name="subflow", cache_policy=NO_CACHE)
def _run_subflow(call: Callable[[], State]) -> State:
    """The task ends in the subflow's state type (Failed when it failed); its result is the subflow's state."""
    return call()


def run_subflows(calls: dict[str, Callable[[], State]], max_parallel: int, stop_on_failure: bool) -> dict[str, State]:
    """Run each `name -> call` (a subflow call with `return_state=True`), in order, up to
    `max_parallel` at once. With `stop_on_failure`, nothing new starts after a failure (runs
    in flight finish); the calls never started are missing from the returned states."""
    queue, in_flight, states = list(calls.items()), {}, {}
    with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:
        while queue or in_flight:
            stopping = bool(interrupted()) or (stop_on_failure and any(not s.is_completed() for s in states.values()))
            while queue and len(in_flight) < max_parallel and not stopping:
                name, call = queue.pop(0)
                future = runner.submit(_run_subflow.with_options(task_run_name=f"run-{name}"), {"call": call})
                in_flight[future.wrapped_future] = (name, future)
            if not in_flight:
                break
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for finished in done:
                name, future = in_flight.pop(finished)
                future.wait()
                state = future.state.result(raise_on_failure=False)
                if isinstance(state, BaseException):  # the wrapping task broke, not the subflow
                    raise state
                states[name] = state
    if len(states) < len(calls):
        get_run_logger().warning(f"stopped after a failure; not started: {', '.join(n for n in calls if n not in states)}")
    return states


def training_parallelism(limit: str, devices: int, dispatched: bool) -> int:
    """How many trainings of `devices` devices each may run at once: the slots of the global
    concurrency limit `limit`, and, when they train on this host, this host's devices."""
    slots = ensure_concurrency_limit(limit)
    if not dispatched:
        here = len(host_devices().ids)
        if here > slots:
            get_run_logger().warning(
                f"the global concurrency limit {limit!r} has {slots} slot(s) but this host has {here} devices; "
                f"`prefect gcl update {limit} --limit {here}` trains on all of them")
        slots = min(slots, here)
    return max(1, slots // devices)


def subflow_outcome(state: State | None) -> Any:
    """What a subflow run returned (its result also when it failed its gates), the exception it
    failed with, or None when it never started."""
    return None if state is None else state.result(raise_on_failure=False)
