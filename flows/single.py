"""single: one dataset to a trained, evaluated and registered LoRA adapter.

    python flows/single.py                 # demo: MiniLM on the bundled topics dataset, offline
    python flows/single.py params.yaml     # your parameters (YAML or JSON, see README)

The flow reads as the pipeline; every step is a Prefect task around a loraflow core
function, with its own retry and cache policy (see `tasks/`).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from loraflow.config import SingleParams
from loraflow.gates import check_gates
from loraflow.plan import plan_run, resolve_config, write_resolved_config
from loraflow.report import RunResult, failure_message, write_result
from loraflow.train.trainer import TrainRequest
from tasks.data import dask_task_runner, prepare_dataset_task, tokenize_dataset
from tasks.evaluation import evaluate_task, samples_task
from tasks.registry import register_task
from tasks.reporting import publish_summary
from tasks.stages import StageRecorder
from tasks.training import train_adapter_task

RESULT_STORAGE_DIRNAME = ".loraflow-cache"


def demo_params(output_dir: str = "runs") -> SingleParams:
    """The offline demo: the bundled MiniLM on the bundled five-topic dataset."""
    sample = Path(__file__).resolve().parents[1] / "loraflow" / "sample_data" / "topics.csv"
    return SingleParams(dataset={"path": str(sample)}, gates={"accuracy": 0.85}, output_dir=output_dir)


@flow(name="single", description="One dataset to a trained, evaluated and registered LoRA adapter.")
def single(params: SingleParams) -> State:
    plan = plan_run(params)
    layout = plan.layout
    stages = StageRecorder(Path(params.output_dir).resolve() / RESULT_STORAGE_DIRNAME)

    prepared = stages.run("prepare", prepare_dataset_task, params.dataset, params.task, layout.data, params.seed)
    config = resolve_config(plan, prepared)
    write_resolved_config(config, layout.config)

    tokenize = tokenize_dataset.with_options(task_runner=dask_task_runner(params.dask_address))
    with stages.timed("tokenize") as stage:
        shards, stage.cached = tokenize(
            prepared, plan.model_path, params.task, config.settings.max_length, params.shard_size,
            layout.data / "tokens", stages.result_storage,
        )

    request = TrainRequest(
        model_path=plan.model_path, task=params.task, settings=config.settings, labels=config.labels,
        train_shards=shards["train"], eval_shards=shards.get("validation", []),
        checkpoint_dir=str(layout.checkpoints), adapter_dir=str(layout.model), logs_dir=str(layout.logs),
        seed=params.seed,
    )
    trained = stages.run("train", train_adapter_task, config, request, params.gpu_concurrency_limit)

    metrics = stages.run("evaluate", evaluate_task, config, shards["test"], trained.adapter_dir, layout.eval / "metrics.json")
    baseline = stages.run("baseline", evaluate_task, config, shards["test"], None, layout.eval / "baseline.json")
    samples = stages.run("samples", samples_task, config, trained.adapter_dir, prepared.sample_prompts_path,
                         layout.samples / "predictions.jsonl")

    gates = {verdict.metric: verdict for verdict in check_gates(metrics, params.gates)}
    passed = all(gate.passed for gate in gates.values())
    version = stages.run("register", register_task, params.registry_root, config, trained.adapter_dir, metrics, passed)

    result = RunResult(
        name=plan.name, status="passed" if passed else "failed_gates", task=params.task, model=params.model,
        model_path=plan.model_path,
        passed=passed, metrics=metrics, baseline=baseline, gates=gates, adapter_path=trained.adapter_dir,
        registry_version=version.version, registry_path=version.path, timings=stages.timings,
        cached=stages.cached, cached_stages=[s for s, hit in stages.cached.items() if hit],
        counts=prepared.counts, train=trained.model_dump(), flow_run_id=flow_run.get_id(),
        paths={"result": str(layout.result), "config": str(layout.config / "resolved.yaml"),
               "samples": samples, "rejects": prepared.rejects_path, "manifest": prepared.manifest_path},
    )
    write_result(result, layout.result)
    publish_summary(result)
    if not passed:
        get_run_logger().error(failure_message(result))
        return Failed(message=failure_message(result), data=result)
    return Completed(message=f"{plan.name}: all gates passed", data=result)


if __name__ == "__main__":
    from flows.cli import run_from_command_line

    raise SystemExit(run_from_command_line(single, SingleParams, demo_params))
