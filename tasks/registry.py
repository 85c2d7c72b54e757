"""Registry tasks: register the adapter and let the promotion rule move its alias (`loraflow.pipeline`),
and move an alias by hand (the `registry` flow)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.runtime import flow_run

from loraflow.pipeline import register_and_decide, register_key
from loraflow.plan import ResolvedConfig
from loraflow.promotion import PromotionRequest
from loraflow.registry import PROMOTED_ALIAS, AliasMove, Registry, RegistryVersion
from orchestration import events
from tasks.policies import transient_retries


@task(name="register-adapter", cache_key_fn=lambda context, parameters: register_key(parameters), **transient_retries())
def register_task(
    registry_root: str, config: ResolvedConfig, adapter_dir: str, metrics: dict, passed: bool,
    alias: str = PROMOTED_ALIAS, gates: dict[str, float] | None = None, promotion: PromotionRequest | None = None,
    merged: str | None = None,
) -> RegistryVersion:
    """Register the adapter, record this verdict, and point `alias` at it when `promotion`'s rule
    allows (default: every gate passed). Keyed on the gates and the rule too: the same adapter
    judged otherwise is a new verdict, not a cache hit."""
    version, move = register_and_decide(registry_root, config, adapter_dir, metrics, passed, alias, gates, promotion,
                                        merged, flow_run_id=flow_run.get_id(), log=get_run_logger().info)
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
