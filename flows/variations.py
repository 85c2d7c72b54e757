"""variations: one dataset trained under a grid of settings; prepared once, ranked, best registered.

    python flows/variations.py                      # demo: learning rate x LoRA rank on topics, offline
    python flows/variations.py params.yaml          # your grid (YAML or JSON, see README)
    python flows/variations.py params.yaml --plan   # every variant's name, settings and steps; train nothing

The dataset is prepared and tokenised once (`prepare_data`); each variant then trains and
evaluates as its own subflow run named by `name_template`, as many at once as there are free
devices (and slots of the GPU concurrency limit): two device slots train two variants at a time. `leaderboard.csv` (and a table artifact) ranks them by
`metric`; the best variant that passes its gates is registered under the dataset's name
with the alias `best`. The run ends Failed when no variant passed or a variant broke.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import flow
from prefect.states import State

from flows.single import prepare_data, train_evaluate
from loraflow.config import VariationsParams
from loraflow.grid import Variant, rank_metric
from loraflow.pipeline import PipelineRun
from loraflow.plan import PreparedData, RunPlan
from loraflow.registry import BEST_ALIAS, RegistryVersion
from loraflow.report import RunOutcome
from loraflow.variations import (
    VariationsResult,
    best_variant,
    leaderboard,
    variant_plans,
)
from orchestration.dispatch import should_dispatch
from orchestration.dry_run import dry_run_variations
from orchestration.prefect_workarounds import hold_run_folder
from orchestration.reporting import (
    cancelled_when_stopped,
    dry_run_state,
    final_state,
    first_cancelled,
    publish_leaderboard,
)
from orchestration.stages import StageRecorder, result_storage
from tasks.registry import register_task
from tasks.subflows import run_subflows, subflow_outcome, training_parallelism
from tasks.tracking import grid_ended_if_failed, report_grid, start_grid_tracking

SAMPLE = Path(__file__).resolve().parents[1] / "loraflow" / "sample_data" / "topics.csv"


def demo_params(output_dir: str = "runs") -> VariationsParams:
    """The offline demo: a 2x2 grid (learning rate x LoRA rank) of short MiniLM runs on topics."""
    return VariationsParams(
        dataset={"path": str(SAMPLE)},
        grid={"learning_rate": [0.001, 0.003], "lora.r": [4, 8]},
        overrides={"num_epochs": 2},
        gates={"accuracy": 0.85},
        output_dir=output_dir,
    )


@flow(name="variations", description="One dataset under a grid of settings: prepared once, ranked, best registered.")
def variations(params: VariationsParams) -> State:
    base, variants = variant_plans(params)
    if params.plan_only:
        return dry_run_state(dry_run_variations(params, base, variants))
    # The grid's folder is held for the whole run (the shared data, leaderboard, registration and report);
    # each variant's own folder, below it, is held by its train-evaluate run.
    with cancelled_when_stopped() as waited, hold_run_folder(base.layout.root, params.folder_name):
        return run_grid(params, base, variants)
    return waited.state


def run_grid(params: VariationsParams, base: RunPlan, variants: list[tuple[Variant, RunPlan]]) -> State:
    """Prepare once, train and evaluate every variant, rank them, register the best, report."""
    at_once = training_parallelism(params.gpu_concurrency_limit, max(plan.params.devices for _, plan in variants),
                                   dispatched=should_dispatch(params.training_dispatch))
    with cancelled_when_stopped() as stop:
        data = prepare_data(base, {plan.settings.max_length for _, plan in variants}, devices_at_once=at_once)
    if stop.state:
        return stop.state
    variants = start_grid_tracking(params, variants)  # with MLflow: the grid's parent run
    with grid_ended_if_failed(params, variants):  # the parent run is not left RUNNING if the grid raises
        calls = {variant.name: partial(train_evaluate.with_options(flow_run_name=variant.name), plan, data, None,
                                       return_state=True) for variant, plan in variants}
        states = run_subflows(calls, at_once, stop_on_failure=False)

        metric = rank_metric(params)
        ranked = leaderboard([RunOutcome.of(variant.name, subflow_outcome(states.get(variant.name)),
                                            tuple(data.timings), values=variant.values)
                              for variant, _ in variants], metric)
        best = best_variant(ranked)
        plans = {variant.name: plan for variant, plan in variants}
        version = register_best(plans[best.name], data, best) if best else None
        if version is not None:  # the leaderboard names the version its winner became
            ranked = [outcome.model_copy(update={"registry_version": version.version})
                      if outcome.name == best.name else outcome for outcome in ranked]

        result = VariationsResult(
            name=params.folder_name, dataset=base.name, metric=metric, leaderboard=ranked,
            best=best.name if best else None, registry_name=version.name if version else None,
            registry_version=version.version if version else None,
            prepared={"data_dir": data.prepared.data_dir, "timings": data.timings, "cached": data.cached},
            paths={"leaderboard": str(base.layout.root / "leaderboard.csv"),
                   "variations_result": str(base.layout.root / "variations_result.json")},
        )
        publish_leaderboard(result)
        result = report_grid(params, base, variants, result)  # pictures, report.html, trackers
    return first_cancelled(states.values()) or final_state(result, result.message, failed=not result.ok)


def register_best(plan: RunPlan, data: PreparedData, best: RunOutcome) -> RegistryVersion:
    """Register the winning adapter under the dataset's name and point `best` at it."""
    config = PipelineRun(plan, outputs=data.outputs()).config.model_copy(update={"name": data.prepared.name})
    stages = StageRecorder(result_storage(plan.params))
    return stages.run("register", register_task, plan.params.registry_root, config, best.adapter_path, best.metrics,
                      True, BEST_ALIAS, plan.params.gate_thresholds, merged=best.merged_path)


if __name__ == "__main__":
    from flows.cli import run_from_command_line

    raise SystemExit(run_from_command_line(variations, VariationsParams, demo_params, preflight=variant_plans))
