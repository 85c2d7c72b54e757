"""The `registry` flow as a user meets it: list, show, diff, promote by hand and roll back, from a
flow call and from the command line, each move recorded and announced as an event."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flows.registry import main, parse_args, registry
from loraflow.config import RegistryParams
from loraflow.registry import Registry

REPO = Path(__file__).resolve().parents[1]
CARD = {"dataset_fingerprint": "d", "model_identity": "m", "config": {"lora": {"r": 8}}}


@pytest.fixture
def two_versions(tmp_path):
    """`tickets` with v1 (production) and v2 registered, without training anything."""
    root = tmp_path / "registry"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    for key, accuracy, r in (("k1", 0.8, 8), ("k2", 0.9, 16)):
        (adapter / "adapter_model.safetensors").write_text(key)
        Registry(root).register("tickets", adapter, key, {**CARD, "config": {"lora": {"r": r}}}, {"accuracy": accuracy},
                                True, alias="production" if key == "k1" else None)
    return root


def _alias_events(registry_root: Path) -> dict[str, dict]:
    """The alias-move events of versions under `registry_root` that the server has persisted (it writes
    them in batches), by event name; the session's server also holds every other test's events."""
    wanted = {"loraflow.model.promoted", "loraflow.model.rolled-back"}
    deadline = time.monotonic() + 20
    while True:
        with get_client(sync_client=True) as client:
            response = client.request("POST", "/events/filter",
                                      json={"filter": {"event": {"name": sorted(wanted)}}, "limit": 50})
        found = {event["event"]: event for event in response.json()["events"]
                 if event["resource"].get("loraflow.path.registry", "").startswith(str(registry_root))}
        if wanted <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_promote_by_hand_then_roll_back_records_who_and_emits_events(prefect_server, two_versions):
    promoted = registry(RegistryParams(action="promote", name="tickets", version="v2", comment="reviewed",
                                       registry_dir=str(two_versions)), return_state=True)
    assert promoted.is_completed(), promoted.message
    report = promoted.result()
    assert (report.move.version, report.move.previous, report.move.comment) == (2, 1, "reviewed")
    assert report.move.flow_run_id == str(promoted.state_details.flow_run_id)
    assert "production promote" in report.text()

    rolled = registry(RegistryParams(action="rollback", name="tickets", registry_dir=str(two_versions)))
    assert (rolled.move.how, rolled.move.version, rolled.move.previous) == ("rollback", 1, 2)
    assert Registry(two_versions).resolve("tickets", "production").version == 1

    events = _alias_events(two_versions)
    assert {"loraflow.model.promoted", "loraflow.model.rolled-back"} <= set(events)
    back = events["loraflow.model.rolled-back"]
    assert back["resource"]["loraflow.version"] == "1" and back["payload"]["previous"] == 2
    assert events["loraflow.model.promoted"]["payload"]["comment"] == "reviewed"


def test_list_show_and_diff(prefect_server, two_versions):
    root = str(two_versions)
    listed = registry(RegistryParams(action="list", name="tickets", registry_dir=root)).text()
    assert listed.splitlines()[0] == "tickets: 2 version(s)" and "<- production" in listed.splitlines()[2]
    assert registry(RegistryParams(action="list", registry_dir=root)).text() == "tickets"
    shown = registry(RegistryParams(action="show", name="tickets", version="production", registry_dir=root)).text()
    assert shown.startswith("tickets v1 ")
    diff = registry(RegistryParams(action="diff", name="tickets", version="1", other="2", registry_dir=root)).text()
    assert "accuracy         0.8000     0.9000    +0.1000" in diff and "config.lora.r: 8 -> 16" in diff


@pytest.mark.parametrize("args, expected", [
    (["rollback"], "rollback needs name"),
    (["promote", "tickets", "latest"], "promote: version 'latest' is not a version number"),
    (["undo", "tickets"], "the first argument is the action"),
    (["diff", "tickets", "1", "2", "3"], "diff takes at most 3 arguments"),
    (["list", "--registry"], "--registry needs a value"),
])
def test_bad_command_lines_are_one_line_and_exit_2(args, expected, capsys):
    assert main(args) == 2
    assert expected in capsys.readouterr().err.splitlines()[0]


def test_command_line_words_become_parameters():
    params = parse_args(["promote", "tickets", "3", "staging", "--comment", "ok", "--registry", "r"])
    assert params.model_dump() == {"action": "promote", "name": "tickets", "version": "3", "other": None,
                                   "alias": "staging", "comment": "ok", "registry_dir": "r"}


def test_rollback_from_the_command_line(two_versions):
    """`python flows/registry.py rollback tickets production`, as a user types it (its own temporary server)."""
    Registry(two_versions).promote("tickets", 2, "production")
    done = subprocess.run([sys.executable, "flows/registry.py", "rollback", "tickets", "production",
                           "--registry", str(two_versions)], cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(REPO),
                               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"})  # a busy machine
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[0] == f"tickets v1  {two_versions / 'tickets' / 'v1'}"
    assert Registry(two_versions).resolve("tickets", "production").version == 1


def test_a_failed_action_exits_1_with_its_reason(prefect_server, two_versions, capsys):
    assert main(["rollback", "tickets", "--registry", str(two_versions)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: registry: alias 'production' of tickets has no earlier version to roll back to")
