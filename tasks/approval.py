"""Approval in the Prefect UI: a run whose promotion is held (`approval: required`) asks a person.

A deployment run suspends itself (`suspend_flow_run`): its process exits, so nothing holds a
device or memory while it waits. Resumed with an answer (the UI's form, or
`POST /api/flow_runs/<id>/resume` with `{"run_input": {"decision": "approve", "comment": "..."}}`),
a worker starts it again: every stage is served from the cache, so nothing trains again, and
`suspend_flow_run` with the same key returns the answer. A bare run (`python flows/single.py`)
has no worker to start it again, so it pauses in its process instead (`pause_flow_run`, the same
form), after stopping its model processes. No answer within `approval_timeout_s` leaves the
version registered and not promoted.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from prefect import get_client, get_run_logger, task
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.states import Running

from loraflow.model_process import stop_model_processes
from loraflow.promotion import ApprovalAnswer
from loraflow.registry import Registry, RegistryVersion
from loraflow.report import RunResult, write_result
from orchestration import events
from orchestration.prefect_workarounds import waiting_for_a_person
from orchestration.reporting import publish_summary


class ApprovalForm(RunInput):
    """The resume form: approve or reject the held promotion, with a comment for the record."""

    decision: Literal["approve", "reject"] = "approve"
    comment: str = ""


@task(name="answer-approval")
def answer_approval_task(registry_root: str, name: str, version: int, answer: ApprovalAnswer) -> RegistryVersion:
    """Record the answer on the version's verdict; approved, move its alias (and announce it)."""
    registry = Registry(registry_root)
    registered, move = registry.answer_approval(name, version, answer)
    get_run_logger().info(f"{name} v{version}: {registered.decision.reason}")
    if move is not None:
        events.alias_moved(registered, registered.decision.alias, move)
    return registered


def _where_to_answer() -> str:
    with get_client(sync_client=True) as client:
        api = str(client.api_url).rstrip("/")
    return (f"the Prefect UI ({api.removesuffix('/api')}/runs/flow-run/{flow_run.get_id()}) or "
            f"POST {api}/flow_runs/{flow_run.get_id()}/resume")


def await_approval(result: RunResult, registry_root: str, timeout_s: int) -> RunResult:
    """Ask for the held promotion of `result`'s version and apply the answer; the result as it ends.
    Returns `result` unchanged when its promotion waits for nobody."""
    decision = result.promotion
    if decision is None or not decision.awaiting_approval or result.registry_version is None:
        return result
    name, number = result.name, result.registry_version
    logger = get_run_logger()
    form = ApprovalForm.with_initial_data(description=decision.approval_request(name, number))
    key = f"approval-{name}-v{number}"
    if FlowRunContext.get().flow_run.deployment_id:  # a worker can start it again; a batch's per-dataset subflow cannot
        logger.info(f"{name} v{number} waits for approval: this run suspends (its process ends, holding no device) "
                    f"until approved or rejected in {_where_to_answer()}; after {timeout_s}s it stays unpromoted")
        given = suspend_flow_run(wait_for_input=form, timeout=timeout_s, key=key)
    else:
        if not flow_run.get_parent_flow_run_id():  # in a batch, the other datasets' evaluations may use them
            stop_model_processes()
        logger.warning(f"{name} v{number} waits for approval: not a deployment run, so no worker could resume it "
                       f"after a suspension; it pauses in this process, holding no device (training gave its slot "
                       f"back), until approved or rejected in {_where_to_answer()}")
        try:
            with waiting_for_a_person():  # Ctrl-C ends a bare run at once here: it holds nothing
                given = pause_flow_run(wait_for_input=form, timeout=timeout_s, key=key, poll_interval=2)
        except FlowPauseTimeout:  # the run goes on (Prefect left it Paused) and ends as trained: unpromoted
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run.get_id(), Running(message="no approval answer in time"), force=True)
            logger.warning(f"{name} v{number}: no answer within {timeout_s}s; it stays registered and not promoted "
                           f"(promote it later with `python flows/registry.py promote {name} {number}`)")
            return result
    answer = ApprovalAnswer(approved=given.decision == "approve", comment=given.comment,
                            flow_run_id=flow_run.get_id(), when=datetime.now(timezone.utc).isoformat())
    version = answer_approval_task(registry_root, name, number, answer)
    answered = result.model_copy(update={"promotion": version.decision})
    write_result(answered, answered.paths["result"])
    publish_summary(answered)
    return answered
