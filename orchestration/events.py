"""Prefect events for what a loraflow run produced, so users can build automations on them.

Every event's resource is the dataset (`loraflow.dataset.<name>`) and carries its name, a
version and the paths of what was written; inside a run Prefect adds the flow and task run
as related resources. Event names:

    loraflow.dataset.prepared   version = dataset fingerprint
    loraflow.model.trained      version = resolved-config fingerprint
    loraflow.gates.passed / loraflow.gates.failed   version = registry version
    loraflow.model.registered   version = registry version
    loraflow.model.promoted / loraflow.model.rolled-back   version = the version the alias now names

An automation matching `loraflow.dataset.updated` (see prefect.yaml) goes the other way:
it starts `single` on the dataset path the event carries.
"""

from __future__ import annotations

from typing import Any

from prefect.events import Event, emit_event

from loraflow.data.prepare import PreparedDataset
from loraflow.plan import ResolvedConfig
from loraflow.registry import AliasMove, RegistryVersion
from loraflow.report import RunResult, scalar_metrics
from loraflow.train.request import TrainResult


def emit(event: str, name: str, version: Any, paths: dict[str, str | None], payload: dict[str, Any]) -> Event | None:
    """One loraflow event; resource labels are strings, so paths become `loraflow.path.<kind>`."""
    resource = {
        "prefect.resource.id": f"loraflow.dataset.{name}",
        "prefect.resource.name": name,
        "loraflow.dataset.name": name,
        "loraflow.version": str(version),
    }
    resource.update({f"loraflow.path.{kind}": str(path) for kind, path in paths.items() if path})
    return emit_event(f"loraflow.{event}", resource=resource, payload=payload)


def dataset_prepared(prepared: PreparedDataset) -> Event | None:
    return emit(
        "dataset.prepared", prepared.name, prepared.fingerprint,
        {"data": prepared.data_dir, "manifest": prepared.manifest_path, "rejects": prepared.rejects_path},
        {"counts": prepared.counts, "labels": prepared.labels},
    )


def model_trained(config: ResolvedConfig, trained: TrainResult) -> Event | None:
    return emit(
        "model.trained", config.name, config.fingerprint, {"adapter": trained.adapter_dir},
        {"model": config.model, "task": config.task, "train": trained.model_dump()},
    )


def gates_checked(result: RunResult) -> Event | None:
    return emit(
        "gates.passed" if result.passed else "gates.failed", result.name, result.registry_version,
        {"adapter": result.adapter_path, "registry": result.registry_path, "result": result.paths.get("result")},
        {"gates": {name: gate.model_dump() for name, gate in result.gates.items()},
         "metrics": scalar_metrics(result.metrics)},
    )


def model_registered(version: RegistryVersion) -> Event | None:
    return emit(
        "model.registered", version.name, version.version, {"registry": version.path},
        {"passed": version.passed, "metrics": version.metrics, "key": version.key},
    )


def alias_moved(version: RegistryVersion, alias: str, move: AliasMove) -> Event | None:
    """An alias moved, by a run's promotion rule or by hand: where from, who moved it and why."""
    return emit(
        "model.promoted" if move.how == "promote" else "model.rolled-back", version.name, version.version,
        {"registry": version.path}, {"alias": alias, **move.model_dump()},
    )
