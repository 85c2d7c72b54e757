"""The registration task: add the adapter to the registry, promote it when its gates pass."""

from __future__ import annotations

from prefect import get_run_logger, task

from loraflow.plan import ResolvedConfig
from loraflow.registry import Registry, RegistryVersion
from tasks import events
from tasks.policies import adapter_fingerprint, fingerprint_key, transient_retries

PROMOTED_ALIAS = "production"


def _register_key(context, parameters) -> str:
    return fingerprint_key(
        "register",
        parameters["config"].fingerprint,
        adapter_fingerprint(parameters["adapter_dir"]),
        parameters["registry_root"],
        parameters["passed"],
        parameters["alias"],
    )


@task(name="register-adapter", cache_key_fn=_register_key, **transient_retries())
def register_task(
    registry_root: str, config: ResolvedConfig, adapter_dir: str, metrics: dict, passed: bool,
    alias: str = PROMOTED_ALIAS,
) -> RegistryVersion:
    """Register a version keyed by the config fingerprint (idempotent: identical inputs never
    add a version) and point `alias` (`production`; `best` for a variations winner) at it only
    when every gate passed."""
    registry = Registry(registry_root)
    card = {
        "task": config.task,
        "base_model": config.model,
        "model_identity": config.model_identity,
        "dataset_fingerprint": config.dataset_fingerprint,
        "code_version": config.code_version,
        "config": config.model_dump(),
    }
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    version, created = registry.register(config.name, adapter_dir, config.fingerprint, card, scalars, passed)
    logger = get_run_logger()
    logger.info(f"{'registered' if created else 'already registered as'} {config.name} v{version.version}")
    if passed:
        registry.promote(config.name, version.version, alias)
        logger.info(f"{config.name}: alias {alias!r} -> v{version.version}")
    events.model_registered(version)
    return version
