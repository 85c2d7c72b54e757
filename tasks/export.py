"""The export task: `export: merged` writes the base model with the adapter merged in, for serving."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from loraflow.pipeline import export_key, export_merged
from loraflow.plan import ResolvedConfig
from tasks.policies import transient_retries


@task(name="export-merged", cache_key_fn=lambda context, parameters: export_key(parameters), **transient_retries(1))
def export_merged_task(config: ResolvedConfig, adapter_dir: str, out_dir: Path) -> str:
    """Merge in a model process of its own; cached on the adapter's bytes, so a retrained adapter is merged again."""
    return export_merged(config, adapter_dir, out_dir, log=get_run_logger().info)
