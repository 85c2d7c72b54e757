"""batch: many datasets, each through the `single` pipeline as its own subflow run.

    python flows/batch.py                      # demo: three bundled datasets on MiniLM, offline
    python flows/batch.py params.yaml          # your datasets (YAML or JSON, see README)
    python flows/batch.py params.yaml --plan   # every dataset's plan; train nothing

With `strategy: parallel` up to `max_parallel` datasets run at once: their preparation
overlaps while their training queues on the global GPU slots, so a parallel batch never
oversubscribes the device. With `continue_on_error` (the default) every dataset finishes and
the batch then ends Failed naming the failed ones; without it, it stops at the first failure.
`<output_dir>/<name>/batch_result.json` and a table artifact describe every dataset.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import flow
from prefect.states import State

from flows.single import single
from loraflow.batch import BatchResult, dataset_runs
from loraflow.config import BatchParams
from loraflow.report import RunOutcome
from orchestration.dry_run import dry_run_batch
from orchestration.reporting import dry_run_state, final_state, first_cancelled, publish_batch
from tasks.subflows import run_subflows, subflow_outcome

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "loraflow" / "sample_data"


def demo_params(output_dir: str = "runs") -> BatchParams:
    """The offline demo: topics, product-review sentiment and support-ticket routing, two at a time."""
    return BatchParams(
        datasets=[
            {"path": str(SAMPLE_DATA / "topics.csv")},
            {"path": str(SAMPLE_DATA / "sentiment.jsonl"), "overrides": {"num_epochs": 8}},
            {"path": str(SAMPLE_DATA / "support.csv"), "text_column": "message", "label_column": "queue",
             "overrides": {"num_epochs": 6}},
        ],
        overrides={"num_epochs": 3},
        gates={"accuracy": 0.8},
        output_dir=output_dir,
    )


@flow(name="batch", description="Many datasets, each through the single pipeline, with one aggregate result.")
def batch(params: BatchParams) -> State:
    runs = dataset_runs(params)
    folder = Path(params.output_dir).resolve() / params.name
    if params.plan_only:
        return dry_run_state(dry_run_batch(params, runs, folder))

    calls = {run.dataset.resolved_name: partial(single.with_options(flow_run_name=run.dataset.resolved_name),
                                                run, return_state=True) for run in runs}
    states = run_subflows(calls, params.parallelism, stop_on_failure=not params.continue_on_error)

    outcomes = [RunOutcome.of(name, subflow_outcome(states.get(name)), dataset=run.dataset.path)
                for name, run in zip(calls, runs)]
    result = BatchResult(name=params.name, strategy=params.strategy, datasets=outcomes,
                         paths={"batch_result": str(folder / "batch_result.json")})
    publish_batch(result)
    return first_cancelled(states.values()) or final_state(result, result.message, failed=bool(result.failed))


if __name__ == "__main__":
    from flows.cli import run_from_command_line

    raise SystemExit(run_from_command_line(batch, BatchParams, demo_params, preflight=dataset_runs))
