"""Evaluation tasks: adapter metrics, the base-model baseline, and sample predictions (`loraflow.pipeline`)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from loraflow.pipeline import evaluate, evaluate_key, sample_predictions, samples_key
from loraflow.plan import ResolvedConfig
from tasks.policies import transient_retries


@task(name="evaluate", cache_key_fn=lambda context, parameters: evaluate_key(parameters), **transient_retries(1))
def evaluate_task(config: ResolvedConfig, test_shards: list[str], adapter_dir: str | None, out_path: Path) -> dict:
    """Metrics on the held-out test split; `adapter_dir=None` evaluates the bare base model
    (the baseline). Cached on the adapter's bytes and the test shards, so a retrained
    adapter is always re-evaluated."""
    return evaluate(config, test_shards, adapter_dir, out_path, log=get_run_logger().info)


@task(name="sample-predictions", cache_key_fn=lambda context, parameters: samples_key(parameters),
      **transient_retries(1))
def samples_task(config: ResolvedConfig, adapter_dir: str, prompts_path: str, out_path: Path) -> str:
    """Run the held-out sample prompts through the adapter so a person can eyeball its output."""
    return sample_predictions(config, adapter_dir, prompts_path, out_path, log=get_run_logger().info)
