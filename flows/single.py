"""single: one dataset to a trained, evaluated and registered LoRA adapter.

    python flows/single.py                      # demo: MiniLM on the bundled topics dataset, offline
    python flows/single.py params.yaml          # your parameters (YAML or JSON, see README)
    python flows/single.py params.yaml --plan   # print what would run and what is cached; train nothing

The flow reads as the pipeline: check the parameters, run the data stages once
(`prepare_data`), then the training stages: train, evaluate, gate and register
(`train_evaluate`, its own subflow run), and, with `approval: required`, ask a person before
`production` moves (`await_approval`). The stages themselves, their inputs and cache keys,
are listed once in `loraflow/pipeline.py`; each runs as a Prefect task around its core
function, with its own retry and cache policy (`tasks/stage_tasks.py`). `batch` runs this
flow per dataset; `variations` runs `prepare_data` once and `train_evaluate` per grid point.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import State

from loraflow.config import SingleParams
from loraflow.pipeline import DATA_STAGES, TRAINING_STAGES, PipelineRun
from loraflow.plan import PreparedData, RunPlan, plan_run, write_resolved_config
from loraflow.registry import PROMOTED_ALIAS
from loraflow.report import RunResult, failure_message, write_result
from orchestration.dry_run import dry_run_single
from orchestration.prefect_workarounds import hold_run_folder
from orchestration.reporting import cancelled_when_stopped, dry_run_state, final_state, first_cancelled, publish_summary
from orchestration.stages import StageRecorder, result_storage
from tasks.approval import await_approval
from tasks.stage_tasks import run_stages
from tasks.tracking import ended_if_failed, report_run, start_tracking


def demo_params(output_dir: str = "runs") -> SingleParams:
    """The offline demo: the bundled MiniLM on the bundled five-topic dataset."""
    sample = Path(__file__).resolve().parents[1] / "loraflow" / "sample_data" / "topics.csv"
    return SingleParams(dataset={"path": str(sample)}, gates={"accuracy": 0.85}, output_dir=output_dir)


@flow(name="single", description="One dataset to a trained, evaluated and registered LoRA adapter.")
def single(params: SingleParams) -> State:
    plan = plan_run(params)
    if params.plan_only:
        return dry_run_state(dry_run_single(plan))
    with cancelled_when_stopped() as stop, hold_run_folder(plan.layout.root, plan.name):  # for the whole run
        data = prepare_data(plan)
        trained = train_evaluate.with_options(flow_run_name=plan.name)(plan, data, return_state=True)
    if stop.state or trained.is_cancelled():
        return stop.state or first_cancelled([trained])
    result = await_approval(trained.result(), params.registry_root, params.approval_timeout_s)
    return final_state(result, failure_message(result) if not result.passed else f"{plan.name}: all gates passed",
                       failed=not result.passed)


def prepare_data(plan: RunPlan, max_lengths: Iterable[int] = (), devices_at_once: int = 1) -> PreparedData:
    """The data stages (`DATA_STAGES`: prepare, tokenise, the bare base model's baseline): the work
    every training run on this data shares. Tokenised at the plan's `max_length` and any others
    given (a grid that varies it). Holds the run folder meanwhile (as does the flow that calls it, for
    its whole run; the lock is re-entrant): a second run of it waits, then finds this one's work in the cache."""
    stages = StageRecorder(result_storage(plan.params))
    run = PipelineRun(plan, max_lengths=max_lengths, devices_at_once=devices_at_once)
    with hold_run_folder(plan.layout.root, plan.name):
        run_stages(DATA_STAGES, run, stages)
    shared = {"prepared", "shards", "baseline"}
    return PreparedData(prepared=run["prepared"], shards=run["shards"], baseline=run["baseline"],
                        baseline_path=str(plan.layout.eval / "baseline.json"),
                        extra={name: value for name, value in run.outputs.items() if name not in shared},
                        timings=stages.timings, cached=stages.cached)


@flow(name="train-evaluate", description="Train, evaluate, gate and register one LoRA adapter on prepared data.")
def train_evaluate(plan: RunPlan, data: PreparedData, registry_alias: str | None = PROMOTED_ALIAS) -> RunResult:
    """The training stages (`TRAINING_STAGES`: train, evaluate, samples, register) on prepared data.
    `registry_alias=None` skips registration (a variations grid registers only its best variant,
    afterwards). Holds the run folder while it writes into it, and ends Cancelled (not Failed) when
    training stops on request."""
    params, layout = plan.params, plan.create_layout()
    with cancelled_when_stopped() as stop, hold_run_folder(layout.root, plan.name):
        stages = StageRecorder(result_storage(params))
        run = PipelineRun(plan, registry_alias=registry_alias, outputs=data.outputs())
        write_resolved_config(run.config, layout.config)
        run.request = start_tracking(plan, run.request)
        with ended_if_failed(run.request):  # an MLflow run of a training that broke is not left running
            run_stages(TRAINING_STAGES, run, stages)

        trained, version = run["trained"], run.outputs.get("version")
        timings, cached = {**data.timings, **stages.timings}, {**data.cached, **stages.cached}
        result = RunResult(
            name=plan.name, status="passed" if run.passed else "failed_gates", task=params.task, model=params.model,
            model_path=plan.model_path, passed=run.passed, metrics=run["metrics"], baseline=data.baseline,
            gates=run.gates, adapter_path=trained.adapter_dir,
            registry_version=version.version if version else None, registry_path=version.path if version else None,
            promotion=version.decision if version else None,
            timings=timings, cached=cached, cached_stages=[s for s, hit in cached.items() if hit],
            counts=data.prepared.counts, train=trained.model_dump(), flow_run_id=flow_run.get_id(),
            data_warnings=data.prepared.warnings, classes_missing=data.prepared.classes_missing,
            paths={"result": str(layout.result), "config": str(layout.config / "resolved.yaml"),
                   "samples": run["samples"], "baseline": data.baseline_path, "rejects": data.prepared.rejects_path,
                   "manifest": data.prepared.manifest_path,
                   **({"merged": run["merged"]} if "merged" in run.outputs else {})},
        )
        write_result(result, layout.result)
        result = report_run(run.request, result)  # pictures, report.html, trackers
        publish_summary(result)
    return stop.state or result


if __name__ == "__main__":
    from flows.cli import run_from_command_line

    raise SystemExit(run_from_command_line(single, SingleParams, demo_params, preflight=plan_run))
