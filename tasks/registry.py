"""The registration task: add the adapter to the registry, promote it when its gates pass (`loraflow.pipeline`)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.runtime import flow_run

from loraflow.pipeline import register, register_key
from loraflow.plan import ResolvedConfig
from loraflow.registry import PROMOTED_ALIAS, RegistryVersion
from tasks import events
from tasks.policies import transient_retries


@task(name="register-adapter", cache_key_fn=lambda context, parameters: register_key(parameters), **transient_retries())
def register_task(
    registry_root: str, config: ResolvedConfig, adapter_dir: str, metrics: dict, passed: bool,
    alias: str = PROMOTED_ALIAS, gates: dict[str, float] | None = None,
) -> RegistryVersion:
    """Register the adapter and record this verdict; `alias` follows a passing one. Keyed on the
    gates too: the same adapter under other gates is a new verdict, not a cache hit."""
    version = register(registry_root, config, adapter_dir, metrics, passed, alias, gates,
                       flow_run_id=flow_run.get_id(), log=get_run_logger().info)
    events.model_registered(version)
    return version
