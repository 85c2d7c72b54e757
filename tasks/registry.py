"""The registration task: add the adapter to the registry, promote it when the promotion rule says so."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.runtime import flow_run

from loraflow.plan import ResolvedConfig
from loraflow.promotion import PromotionRequest
from loraflow.registry import AliasMove, Registry, RegistryVersion
from tasks import events
from tasks.policies import adapter_fingerprint, fingerprint_key, transient_retries

PROMOTED_ALIAS = "production"


def _register_key(context, parameters) -> str:
    config = parameters["config"]
    return fingerprint_key(
        "register",
        config.fingerprint,
        Registry(parameters["registry_root"]).damage(config.name, config.fingerprint),
        adapter_fingerprint(parameters["adapter_dir"]),
        parameters["registry_root"],
        parameters["passed"],
        parameters["alias"],
        parameters["gates"],
        # Not the baseline: it follows from the config, keyed already, and a plan has none to give.
        parameters["promotion"].model_dump(exclude={"baseline"}) if parameters.get("promotion") else None,
    )


@task(name="register-adapter", cache_key_fn=_register_key, **transient_retries())
def register_task(
    registry_root: str, config: ResolvedConfig, adapter_dir: str, metrics: dict, passed: bool,
    alias: str = PROMOTED_ALIAS, gates: dict[str, float] | None = None, promotion: PromotionRequest | None = None,
) -> RegistryVersion:
    """Register a version keyed by the config fingerprint (idempotent: identical inputs never
    add a version), record the verdict of these `gates` on it, and point `alias` (`production`;
    `best` for a variations winner) at it when `promotion`'s rule allows (default: every gate
    passed). Keyed on the gates and the rule too: the same adapter judged otherwise is a new
    verdict, not a cache hit."""
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
    version, outcome, move = registry.register_and_promote(
        config.name, adapter_dir, config.fingerprint, card, scalars, passed, gates=gates, alias=alias,
        flow_run_id=flow_run.get_id(), promotion=promotion)
    logger = get_run_logger()
    said = {"created": "registered", "found": "already registered as",
            "restored": "restored the missing or incomplete folder of"}[outcome]
    logger.info(f"{said} {config.name} v{version.version} ({version.path}); verdict {version.verdict}: "
                f"{'passed' if passed else 'failed'}")
    if version.decision is not None:
        moved = "->" if version.decision.promote else "stays; not"
        logger.info(f"{config.name}: alias {alias!r} {moved} v{version.version}: {version.decision.reason}")
    events.model_registered(version)
    if move is not None:
        events.alias_moved(version, alias, move)
    return version


@task(name="move-alias")
def move_alias_task(registry_root: str, name: str, action: str, alias: str, version: int | None = None,
                    comment: str | None = None) -> AliasMove | None:
    """Promote `version` to `alias` or roll `alias` back, by hand: recorded with this flow run and
    `comment`, and announced as `loraflow.model.promoted` / `loraflow.model.rolled-back`. No retries:
    a rollback retried after it took effect would roll back a second time."""
    registry = Registry(registry_root)
    if action == "promote":
        move = registry.promote(name, version, alias, flow_run_id=flow_run.get_id(), comment=comment)
    else:
        move = registry.rollback(name, alias, flow_run_id=flow_run.get_id(), comment=comment)
    logger = get_run_logger()
    if move is None:
        logger.info(f"{name}: alias {alias!r} already names v{version}; nothing moved")
        return None
    logger.info(f"{name}: alias {alias!r} v{move.previous} -> v{move.version} ({move.how})")
    events.alias_moved(registry.index(name).get(move.version), alias, move)
    return move
