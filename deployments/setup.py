"""Set up loraflow on a Prefect server, idempotently: run it again and nothing changes.

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python deployments/setup.py [--storage PATH_OR_URL] [--gpu-slots N] [--worker NAME=SLOTS ...]

1. work pools `loraflow-cpu` and `loraflow-gpu` (process type) when missing;
2. the loraflow block types, and their saved defaults: `loraflow-storage/default` (where
   persisted results live, default `<repo>/runs`), its result file system
   `loraflow-results`, `loraflow-training-infrastructure/default`, and the hub token
   Secret `loraflow-hub-token` when `HF_TOKEN` is set;
3. the global concurrency limits training holds: `gpu` with the pool's slots, and
   `gpu:<worker>` per named GPU worker (`WORKER_ID=<worker> prefect worker start ...`);
4. the automation `loraflow: crash unresponsive runs`: a flow run that sent a heartbeat and then
   none for `--unresponsive-after` seconds (its worker or machine died) is marked Crashed, so
   a pipeline waiting on its training hears of it instead of waiting for ever. Flow runs send a
   heartbeat every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (Prefect's default 180): keep
   `--unresponsive-after` well above that for every process that runs flows on this server;
5. every deployment in prefect.yaml whose flow file exists (`prefect deploy`).

Flags change the saved blocks; without flags the saved values are kept.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import yaml
from prefect.blocks.core import Block
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.workers.process import ProcessWorker

from blocks import HUB_TOKEN_BLOCK, LoraflowStorage, TrainingInfrastructure
from blocks.infrastructure import DEFAULT_BLOCK_NAME
from blocks.storage import RESULTS_BLOCK_NAME

REPO = Path(__file__).resolve().parents[1]
CPU_POOL = "loraflow-cpu"
UNRESPONSIVE = "loraflow: crash unresponsive runs"


def say(what: str, outcome: str) -> None:
    print(f"{what:<58} {outcome}", flush=True)


def ensure_work_pools(client, names: list[str]) -> None:
    for name in names:
        try:
            client.read_work_pool(name)
            say(f"work pool {name}", "exists")
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
            say(f"work pool {name}", "created")


def save_if_changed(block: Block, name: str) -> Block:
    """Save `block` under `name` unless the saved one already holds the same values."""
    slug = f"{block.get_block_type_slug()}/{name}"
    try:
        saved = type(block).load(name)
        fields = set(type(block).model_fields) - {"block_type_slug"}
        if saved.model_dump(include=fields) == block.model_dump(include=fields):
            say(f"block {slug}", "unchanged")
            return saved
    except ValueError:
        pass
    block.save(name, overwrite=True)
    say(f"block {slug}", "saved")
    return block


def load_or(block_type: type[Block], name: str, default: Block) -> Block:
    try:
        return block_type.load(name)
    except ValueError:
        return default


def ensure_blocks(args: argparse.Namespace) -> TrainingInfrastructure:
    for block_type in (LoraflowStorage, TrainingInfrastructure):
        block_type.register_type_and_schema()
    say("block types loraflow-storage, loraflow-training-infrastructure", "registered")

    storage = load_or(LoraflowStorage, DEFAULT_BLOCK_NAME, LoraflowStorage(basepath=str(REPO / "runs")))
    if args.storage:
        storage = LoraflowStorage(basepath=args.storage)
    save_if_changed(storage, DEFAULT_BLOCK_NAME)
    save_if_changed(storage.result_storage(), RESULTS_BLOCK_NAME)

    infrastructure = load_or(TrainingInfrastructure, DEFAULT_BLOCK_NAME, TrainingInfrastructure())
    if args.gpu_slots:
        infrastructure.gpu_slots = args.gpu_slots
    if args.worker:
        infrastructure.workers = dict(parse_worker(spec) for spec in args.worker)
    save_if_changed(infrastructure, DEFAULT_BLOCK_NAME)

    if os.environ.get("HF_TOKEN"):  # compared and saved, never printed
        save_if_changed(Secret(value=os.environ["HF_TOKEN"]), HUB_TOKEN_BLOCK)
    return infrastructure


def parse_worker(spec: str) -> tuple[str, int]:
    name, _, slots = spec.partition("=")
    if not name or not slots.isdigit() or int(slots) < 1:
        raise SystemExit(f"error: --worker {spec!r}: use NAME=SLOTS, e.g. --worker gpu-1=2")
    return name, int(slots)


def ensure_concurrency_limits(client, limits: dict[str, int]) -> None:
    for name, slots in limits.items():
        try:
            existing = client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            existing = None
        client.upsert_global_concurrency_limit_by_name(name, slots)
        say(f"global concurrency limit {name} ({slots} slot(s))", "exists" if existing == slots else "set")


def unresponsive_runs_automation(after_s: int) -> AutomationCore:
    """Prefect's documented zombie-run automation: no heartbeat (nor end) for `after_s` after one. Only
    runs that send heartbeats are watched: arming it on `Running` too would crash every run of a
    process started without PREFECT_FLOWS_HEARTBEAT_FREQUENCY (a bare `python flows/single.py`)."""
    ends = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    return AutomationCore(
        name=UNRESPONSIVE,
        description="A flow run whose heartbeats stopped (its worker or machine died) is marked Crashed.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *ends}, for_each={"prefect.resource.id"},
            posture=Posture.Proactive, threshold=1, within=timedelta(seconds=after_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=(
            f"no heartbeat for {after_s} s: the process running this flow run (or its worker or machine) died; "
            "run the same parameters again to resume"))],
    )


def ensure_unresponsive_runs_automation(client, after_s: int) -> None:
    wanted = unresponsive_runs_automation(after_s)
    fields = {"trigger", "actions", "enabled", "description"}
    existing = client.read_automations_by_name(UNRESPONSIVE)
    if any(found.model_dump(include=fields) == wanted.model_dump(include=fields) for found in existing):
        say(f"automation {UNRESPONSIVE!r}", "exists")
        return
    for found in existing:
        client.delete_automation(found.id)
    client.create_automation(wanted)
    say(f"automation {UNRESPONSIVE!r} ({after_s} s)", "created")


def deploy(prefect_file: Path) -> None:
    """`prefect deploy` each deployment whose flow file exists (batch/variations may not yet)."""
    config = yaml.safe_load(prefect_file.read_text(encoding="utf-8"))
    names = []
    for spec in config["deployments"]:
        path, _, function = spec["entrypoint"].partition(":")
        name = f"{function}/{spec['name']}"
        if (REPO / path).is_file():
            names.append(name)
        else:
            say(f"deployment {name}", f"skipped ({path} not found)")
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(prefect_file)]
    for name in names:
        command += ["--name", name]
    # `{{ $PWD }}` in prefect.yaml's pull step: where workers find this checkout.
    completed = subprocess.run(command, cwd=REPO, env={**os.environ, "PWD": str(REPO)}, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise SystemExit(f"error: prefect deploy failed (exit {completed.returncode}); its output is above")
    for name in names:
        say(f"deployment {name}", "deployed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage", help="where persisted results live: a path or fsspec URL (default <repo>/runs)")
    parser.add_argument("--gpu-slots", type=int, help="training runs at once on the GPU pool (default 1)")
    parser.add_argument("--worker", action="append", help="a named GPU worker and its slots, NAME=SLOTS (repeatable)")
    parser.add_argument("--unresponsive-after", type=int, default=600,
                        help="seconds without a heartbeat before a flow run is marked Crashed (default 600: over three "
                             "of Prefect's default 180-second heartbeats; 90 when every worker sends one every 30 s)")
    parser.add_argument("--prefect-file", type=Path, default=REPO / "prefect.yaml")
    args = parser.parse_args(argv)
    if not PREFECT_API_URL.value():
        print("error: PREFECT_API_URL is not set: start `prefect server start` and "
              "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (or `prefect cloud login`)", file=sys.stderr)
        return 2

    infrastructure = ensure_blocks(args)
    with get_client(sync_client=True) as client:
        ensure_work_pools(client, [CPU_POOL, infrastructure.work_pool])
        ensure_concurrency_limits(client, infrastructure.limits())
        ensure_unresponsive_runs_automation(client, args.unresponsive_after)
    deploy(args.prefect_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
