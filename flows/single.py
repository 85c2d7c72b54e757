"""single: one dataset to a trained, evaluated and registered LoRA adapter.

    python flows/single.py                      # demo: MiniLM on the bundled topics dataset, offline
    python flows/single.py params.yaml          # your parameters (YAML or JSON, see README)
    python flows/single.py params.yaml --plan   # print what would run and what is cached; train nothing

The flow reads as the pipeline: check the parameters, prepare the data once
(`prepare_data`), then train, evaluate, gate and register (`train_evaluate`, its own
subflow run). `batch` runs this flow per dataset; `variations` runs `prepare_data` once and
`train_evaluate` per grid point. Every step is a Prefect task around a loraflow core
function, with its own retry and cache policy (see `tasks/`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import State

from loraflow.config import SingleParams
from loraflow.gates import check_gates
from loraflow.plan import (
    PreparedData,
    RunPlan,
    plan_run,
    resolve_config,
    write_resolved_config,
)
from loraflow.report import RunResult, failure_message, write_result
from tasks.data import prepare_dataset_task
from tasks.dispatch import train_stage
from tasks.evaluation import evaluate_task, samples_task
from tasks.export import export_merged_task
from tasks.pipeline import result_storage, tokenize_stage, train_request
from tasks.plans import plan_single
from tasks.registry import PROMOTED_ALIAS, register_task
from tasks.reporting import cancelled_when_stopped, final_state, first_cancelled, plan_state, publish_summary
from tasks.stages import StageRecorder
from tasks.tracking import ended_if_failed, report_run, start_tracking
from tasks.training import hold_run_folder


def demo_params(output_dir: str = "runs") -> SingleParams:
    """The offline demo: the bundled MiniLM on the bundled five-topic dataset."""
    sample = Path(__file__).resolve().parents[1] / "loraflow" / "sample_data" / "topics.csv"
    return SingleParams(dataset={"path": str(sample)}, gates={"accuracy": 0.85}, output_dir=output_dir)


@flow(name="single", description="One dataset to a trained, evaluated and registered LoRA adapter.")
def single(params: SingleParams) -> State:
    plan = plan_run(params)
    if params.plan_only:
        return plan_state(plan_single(plan))
    with cancelled_when_stopped() as stop:
        data = prepare_data(plan)
        trained = train_evaluate.with_options(flow_run_name=plan.name)(plan, data, return_state=True)
    if stop.state or trained.is_cancelled():
        return stop.state or first_cancelled([trained])
    result = trained.result()
    return final_state(result, failure_message(result) if not result.passed else f"{plan.name}: all gates passed",
                       failed=not result.passed)


def prepare_data(plan: RunPlan, max_lengths: Iterable[int] = ()) -> PreparedData:
    """Prepare and tokenise the dataset, and evaluate the bare base model on it: the work every
    training run on this data shares. Tokenised at the plan's `max_length` and any others given
    (a grid that varies it); the baseline uses the plan's. Holds the run folder meanwhile: a second
    run of it waits, then finds this one's work in the cache."""
    params, layout = plan.params, plan.layout
    stages = StageRecorder(result_storage(params))
    with hold_run_folder(layout.root, plan.name):
        prepared = stages.run("prepare", prepare_dataset_task, params.dataset, params.task, layout.data)
        config = resolve_config(plan, prepared)
        shards = {length: tokenize_stage(stages, plan, prepared, length)
                  for length in sorted({config.settings.max_length, *max_lengths})}
        test_shards = shards[config.settings.max_length]["test"]
        baseline_path = layout.eval / "baseline.json"
        baseline = stages.run("baseline", evaluate_task, config, test_shards, None, baseline_path)
    return PreparedData(prepared=prepared, shards=shards, baseline=baseline, baseline_path=str(baseline_path),
                        timings=stages.timings, cached=stages.cached)


@flow(name="train-evaluate", description="Train, evaluate, gate and register one LoRA adapter on prepared data.")
def train_evaluate(plan: RunPlan, data: PreparedData, registry_alias: str | None = PROMOTED_ALIAS) -> RunResult:
    """One adapter from prepared data. `registry_alias=None` skips registration (a variations
    grid registers only its best variant, afterwards). Holds the run folder while it writes into it,
    and ends Cancelled (not Failed) when training stops on request."""
    params, layout = plan.params, plan.create_layout()
    with cancelled_when_stopped() as stop, hold_run_folder(layout.root, plan.name):
        stages = StageRecorder(result_storage(params))
        config = resolve_config(plan, data.prepared)
        write_resolved_config(config, layout.config)
        shards = data.shards[config.settings.max_length]

        request = start_tracking(plan, train_request(plan, config, shards))
        with ended_if_failed(request):  # an MLflow run of a training that broke is not left running
            trained = train_stage(stages, config, request, params)
            metrics = stages.run("evaluate", evaluate_task, config, shards["test"], trained.adapter_dir,
                                 layout.eval / "metrics.json")
            samples = stages.run("samples", samples_task, config, trained.adapter_dir,
                                 data.prepared.sample_prompts_path, layout.samples / "predictions.jsonl")
            merged = stages.run("export", export_merged_task, config, trained.adapter_dir,
                                layout.root / "merged") if params.export == "merged" else None

        gates = {verdict.metric: verdict for verdict in check_gates(metrics, params.gates)}
        passed = all(gate.passed for gate in gates.values())
        version = stages.run(
            "register", register_task, params.registry_root, config, trained.adapter_dir, metrics, passed,
            registry_alias, params.gates,
        ) if registry_alias else None

        timings, cached = {**data.timings, **stages.timings}, {**data.cached, **stages.cached}
        result = RunResult(
            name=plan.name, status="passed" if passed else "failed_gates", task=params.task, model=params.model,
            model_path=plan.model_path,
            passed=passed, metrics=metrics, baseline=data.baseline, gates=gates, adapter_path=trained.adapter_dir,
            registry_version=version.version if version else None, registry_path=version.path if version else None,
            timings=timings, cached=cached, cached_stages=[s for s, hit in cached.items() if hit],
            counts=data.prepared.counts, train=trained.model_dump(), flow_run_id=flow_run.get_id(),
            paths={"result": str(layout.result), "config": str(layout.config / "resolved.yaml"),
                   "samples": samples, "baseline": data.baseline_path, "rejects": data.prepared.rejects_path,
                   "manifest": data.prepared.manifest_path, **({"merged": merged} if merged else {})},
        )
        write_result(result, layout.result)
        result = report_run(request, result)  # pictures, report.html, trackers
        publish_summary(result)
    return stop.state or result


if __name__ == "__main__":
    from flows.cli import run_from_command_line

    raise SystemExit(run_from_command_line(single, SingleParams, demo_params, preflight=plan_run))
