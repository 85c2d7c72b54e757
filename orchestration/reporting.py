"""Publish what runs produce where Prefect users look: the run's Artifacts tab."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Cancelled, Completed, Failed, State

from loraflow.batch import BatchResult
from loraflow.chat_eval import generation_table
from loraflow.dry_run import DryRun
from loraflow.errors import TrainingStopped
from loraflow.layout import atomic_write_jsonl
from loraflow.report import RunResult, outcome_table, summary_markdown, write_csv, write_result
from loraflow.variations import VariationsResult
from orchestration import events


def artifact_key(*parts: str) -> str:
    """Artifact keys may hold only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish_summary(result: RunResult) -> None:
    create_markdown_artifact(
        markdown=summary_markdown(result),
        key=artifact_key(result.name, "summary"),
        description=f"loraflow {result.name}: metrics, baseline, gates and timings",
    )
    generations = generation_table(result.metrics, result.baseline)
    if generations:  # chat: held-out answers of the base model and the adapter, in samples/ and as a table
        atomic_write_jsonl(Path(result.paths["result"]).parent / "samples" / "generations.jsonl", generations)
        create_table_artifact(table=generations, key=artifact_key(result.name, "generations"),
                              description=f"loraflow {result.name}: held-out answers, base model and adapter")
    events.gates_checked(result)


def publish_batch(result: BatchResult) -> None:
    """`batch_result.json`, and every dataset's row as a table artifact."""
    write_result(result, result.paths["batch_result"])
    create_table_artifact(table=outcome_table(result.datasets), key=artifact_key(result.name, "batch"),
                          description=f"loraflow batch {result.name}: every dataset's status, metrics and gates")


def publish_leaderboard(result: VariationsResult) -> None:
    """`leaderboard.csv`, `variations_result.json`, and the leaderboard as a table artifact."""
    rows = outcome_table(result.leaderboard)
    write_csv(rows, result.paths["leaderboard"])
    write_result(result, result.paths["variations_result"])
    create_table_artifact(table=rows, key=artifact_key(result.name, "leaderboard"),
                          description=f"loraflow variations {result.name}: variants ranked by {result.metric}")


def dry_run_state(plan: DryRun) -> State:
    """End a `plan_only` run with its plan (also a Markdown artifact): Completed, or Failed naming
    the datasets that could not be planned."""
    create_markdown_artifact(
        markdown=f"```\n{plan.text()}\n```", key=artifact_key(plan.name, "plan"),
        description=f"loraflow {plan.mode} {plan.name}: execution plan (nothing trained)",
    )
    if plan.errors:
        problems = "; ".join(f"{dataset.name}: {dataset.error}" for dataset in plan.errors)
        return final_state(plan, f"plan: {len(plan.errors)} dataset(s) cannot run: {problems}", failed=True)
    return final_state(plan, f"plan only: {len(plan.runs)} training run(s) planned, nothing trained", failed=False)


def final_state(data: Any, message: str, failed: bool) -> State:
    """A flow run's end: Completed, or Failed with `message` (also logged as an error); `data` is
    what `state.result()` gives a caller either way."""
    if failed:
        get_run_logger().error(message)
        return Failed(message=message, data=data)
    get_run_logger().info(message)
    return Completed(message=message, data=data)


@contextmanager
def cancelled_when_stopped() -> Iterator[SimpleNamespace]:
    """A stop on request inside (a cancel, Ctrl-C, SIGTERM: `TrainingStopped`) ends the flow run
    Cancelled with its reason, not Failed: `return stop.state or ...` after the block."""
    stop = SimpleNamespace(state=None)
    try:
        yield stop
    except TrainingStopped as stopped:
        get_run_logger().warning(str(stopped))
        stop.state = Cancelled(message=str(stopped))


def first_cancelled(states: Iterable[State | None]) -> State | None:
    """A Cancelled state for a parent whose subflow runs were cancelled (the first one's reason), or None."""
    cancelled = next((state for state in states if state is not None and state.is_cancelled()), None)
    return None if cancelled is None else Cancelled(message=cancelled.message)
