"""`python flows/<name>.py [params.yaml] [--plan]`: run a flow from a parameter file, or its demo.

`--plan` sets `plan_only`: the flow validates everything and prints its execution plan
(datasets, row counts, variants, output paths, estimated steps, cached stages), training nothing.

Parameter-file problems are reported as one line and exit code 2 before Prefect starts;
a run that fails (bad data, failed gates) prints its one-line reason and exits 1. Ctrl-C (or
SIGTERM) stops training at a checkpoint, ends the flow runs Cancelled and exits 130 (143) with
one `stopped:` line; a second Ctrl-C quits at once (`orchestration/prefect_workarounds.py`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from loraflow.config import load_params_file
from loraflow.devices import check_devices
from loraflow.errors import LoraflowError
from loraflow.report import RunResult, summary_text
from orchestration.dispatch import launch_options
from orchestration.prefect_workarounds import TerminalSession, finish_cancellation, interrupted, what_was_saved

USAGE = (
    "usage: python flows/{name}.py [PARAMS.yaml|PARAMS.json] [--plan]\n"
    "  no file: run the bundled demo; --plan: print the execution plan and train nothing"
)


def most_devices(params: BaseModel) -> int:
    """The most devices one training of these parameters asks for (a batch's datasets and a grid may set their own)."""
    counts = [params.devices, *(dataset.devices or 1 for dataset in getattr(params, "datasets", []))]
    return max(counts + list(getattr(params, "grid", {}).get("devices", [])))


def run_from_command_line(
    flow: Any,
    params_model: type[BaseModel],
    demo: Callable[[], BaseModel],
    argv: list[str] | None = None,
    preflight: Callable[[Any], Any] | None = None,
) -> int:
    """`preflight(params)` runs the flow's cheap checks (paths, model, LoRA targets) before Prefect
    starts, so a mistake they catch is a one-line exit 2 in seconds, not a failed run."""
    args = sys.argv[1:] if argv is None else argv
    plan_only = "--plan" in args
    args = [arg for arg in args if arg != "--plan"]
    if len(args) > 1 or (args and args[0] in {"-h", "--help"}):
        print(USAGE.format(name=flow.name), file=sys.stderr)
        return 0 if args and args[0] in {"-h", "--help"} else 2
    try:
        params = load_params_file(args[0], params_model) if args else demo()
        if plan_only:
            params = params.model_copy(update={"plan_only": True})
        if preflight is not None:
            preflight(params)
        if params.training_dispatch != "deployment":  # training runs on this host: its devices and rendezvous
            check_devices(most_devices(params))
            launch_options(params).with_rendezvous()
    except LoraflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return run_in_terminal(flow, params)


def run_in_terminal(flow: Any, params: BaseModel) -> int:
    """Run `flow(params)` for the terminal: print what it returned (`summary_text` of a run, else its
    `text()`), and exit 0 when it completed, 1 with its one-line reason when not, 130/143 on Ctrl-C/SIGTERM."""
    # The temporary server's telemetry job races the run for its SQLite file ("database is
    # locked" tracebacks); it inherits this environment when it starts on the first API call.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    stopped = None  # the last line of a run that was interrupted, said once the server is down
    with TerminalSession() as session:
        try:
            state = session.run(flow, params)
        except BaseException:
            if not interrupted():
                raise
        if session.server_lost:
            stopped = f"error: {session.server_lost}; {what_was_saved()}", 1
        elif interrupted():
            session.finish_runs()
            stopped = session.stopped_line(), session.exit_code()
        else:
            state = finish_cancellation(state)
    if stopped:
        print(stopped[0], file=sys.stderr)
        return stopped[1]
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, RunResult):
        print("\n" + summary_text(outcome))
    elif isinstance(outcome, BaseModel) and callable(getattr(outcome, "text", None)):  # plans, batches, grids
        print("\n" + outcome.text())
    if state.is_completed():
        return 0
    reason = state.message if state.is_cancelled() or not isinstance(outcome, BaseException) else outcome
    print(f"error: {reason}", file=sys.stderr)
    return 1
