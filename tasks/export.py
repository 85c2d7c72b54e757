"""The export task: `export: merged` writes the base model with the adapter merged in, for serving."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from loraflow.devices import lease_devices
from loraflow.model_process import run_model_work
from loraflow.plan import ResolvedConfig
from tasks.policies import adapter_fingerprint, fingerprint_key, transient_retries


def _export_key(context, parameters) -> str:
    return fingerprint_key("export-merged", parameters["config"].model_identity,
                           adapter_fingerprint(parameters["adapter_dir"]), str(parameters["out_dir"]))


@task(name="export-merged", cache_key_fn=_export_key, **transient_retries(1))
def export_merged_task(config: ResolvedConfig, adapter_dir: str, out_dir: Path) -> str:
    """Merge in a model process of its own (loading a model never happens in the flow's process);
    cached on the adapter's bytes, so a retrained adapter is merged again."""
    with lease_devices(1, f"merged export of {config.name!r}", log=get_run_logger().info) as lease:
        merged = run_model_work("loraflow.export:export_merged", config.model, adapter_dir, out_dir, lease=lease)
    get_run_logger().info(f"merged model written to {merged}")
    return merged
