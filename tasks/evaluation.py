"""Evaluation tasks: adapter metrics, the base-model baseline, and sample predictions."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from loraflow.devices import lease_devices
from loraflow.layout import atomic_write_json
from loraflow.model_process import run_model_work
from loraflow.plan import ResolvedConfig
from tasks.policies import adapter_fingerprint, fingerprint_key, transient_retries


def _evaluate_key(context, parameters) -> str:
    config = parameters["config"]
    # The baseline has no adapter: only what changes the bare model's scores keys it, not LoRA settings.
    settings = config.settings
    baseline = [config.model_identity, config.task, config.labels, settings.eval_batch_size, config.seed,
                settings.max_length, config.generation.model_dump() if config.generation else None]
    return fingerprint_key(
        "evaluate",
        config.fingerprint if parameters["adapter_dir"] else baseline,
        parameters["test_shards"],
        adapter_fingerprint(parameters["adapter_dir"]),
        str(parameters["out_path"]),
    )


@task(name="evaluate", cache_key_fn=_evaluate_key, **transient_retries(1))
def evaluate_task(config: ResolvedConfig, test_shards: list[str], adapter_dir: str | None, out_path: Path) -> dict:
    """Metrics on the held-out test split; `adapter_dir=None` evaluates the bare base model
    (the baseline). Cached on the adapter's bytes and the test shards, so a retrained
    adapter is always re-evaluated."""
    what = f"{'evaluation' if adapter_dir else 'baseline'} of {config.name!r}"
    with lease_devices(1, what, log=get_run_logger().info) as lease:
        metrics = run_model_work(
            "loraflow.evaluate:evaluate_model", config.model, config.task, config.labels, test_shards, adapter_dir,
            eval_batch_size=config.settings.eval_batch_size, seed=config.seed, generation=config.generation,
            lease=lease,
        )
    atomic_write_json(out_path, metrics)
    scalars = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    get_run_logger().info(f"{'adapter' if adapter_dir else 'baseline'} metrics: {scalars}")
    return metrics


def _samples_key(context, parameters) -> str:
    return fingerprint_key(
        "samples",
        parameters["config"].fingerprint,
        adapter_fingerprint(parameters["adapter_dir"]),
        str(parameters["prompts_path"]),
        str(parameters["out_path"]),
    )


@task(name="sample-predictions", cache_key_fn=_samples_key, **transient_retries(1))
def samples_task(config: ResolvedConfig, adapter_dir: str, prompts_path: str, out_path: Path) -> str:
    """Run the held-out sample prompts through the adapter so a person can eyeball its output."""
    with lease_devices(1, f"sample predictions of {config.name!r}", log=get_run_logger().info) as lease:
        rows = run_model_work(
            "loraflow.samples:run_sample_prompts", config.model, config.task, config.labels, adapter_dir, prompts_path,
            out_path, max_length=config.settings.max_length, max_new_tokens=config.settings.max_new_tokens, lease=lease,
        )
    get_run_logger().info(f"wrote {len(rows)} sample predictions to {out_path}")
    return str(out_path)
