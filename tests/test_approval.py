"""`approval: required`: the rule's promotion waits for a person's answer. The core (the held
decision, the answer, the registry recording it atomically, a gate profile asking for it) and a
bare run that pauses with the form, is answered through the REST API, and promotes or times out.
The deployment run that suspends (its process gone while it waits) is in test_deployments.py."""

from __future__ import annotations

import contextvars
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from loraflow.config import SingleParams
from loraflow.gates import check_gates, load_gate_profile
from loraflow.promotion import ApprovalAnswer, PromotionRequest, decide
from loraflow.registry import Registry
from tests.production_stack import resume_run
from tests.test_flow_single import classification_params
from tests.test_registry import _adapter

WHEN = "2026-12-02T00:00:00+00:00"


def _held(metrics: dict[str, float]):
    verdicts = check_gates(metrics, {"accuracy": 0.5})
    request = PromotionRequest(rule="passes", approval="required", verdicts=verdicts, baseline={"accuracy": 0.2})
    return decide(request, "production", True, metrics, None)


def test_a_held_promotion_waits_and_the_answer_makes_it_final():
    held = _held({"accuracy": 0.9})
    assert (held.promote, held.awaiting_approval) == (False, True)
    assert held.reason == "gates passed; held for approval (approval: required)"
    form = held.approval_request("tickets", 3)
    assert form.startswith("### Promote tickets v3 to `production`?")
    assert "| accuracy | 0.2000 | - | 0.9000 | - |" in form and "**reject** leaves it unset" in form

    approved = held.answered(ApprovalAnswer(approved=True, comment="reviewed by ana", when=WHEN))
    assert (approved.promote, approved.awaiting_approval) == (True, False)
    assert approved.reason == "gates passed; approved (reviewed by ana)"
    rejected = held.answered(ApprovalAnswer(approved=False, when=WHEN))
    assert (rejected.promote, rejected.reason) == (False, "gates passed; rejected")
    assert not decide(PromotionRequest(approval="required"), "production", False, {}, None).awaiting_approval, \
        "a run the rule would not promote asks nobody"


def test_the_registry_records_the_answer_and_moves_the_alias_in_one_write(tmp_path):
    registry, tiny_adapter_dir = Registry(tmp_path / "registry"), _adapter(tmp_path / "adapter")
    request = PromotionRequest(rule="passes", approval="required")
    first, _, move = registry.register_and_promote("tickets", tiny_adapter_dir, "key-1", {}, {"accuracy": 0.9}, True,
                                                   alias="production", promotion=request)
    assert move is None and first.decision.awaiting_approval and "production" not in registry.index("tickets").aliases

    answer = ApprovalAnswer(approved=True, comment="ok", flow_run_id="run-1", when=WHEN)
    version, move = registry.answer_approval("tickets", first.version, answer)
    index = registry.index("tickets")
    assert index.aliases["production"] == 1 and move.comment == "gates passed; approved (ok)"
    assert move.flow_run_id == "run-1" and index.get(1).decision.approval == answer
    assert registry.answer_approval("tickets", 1, answer) == (index.get(1), None), "answered once: a resume asks again"

    second, _, _ = registry.register_and_promote("tickets", tiny_adapter_dir, "key-2", {}, {"accuracy": 0.95}, True,
                                                 alias="production", promotion=request)
    version, move = registry.answer_approval("tickets", second.version, ApprovalAnswer(approved=False, when=WHEN))
    index = registry.index("tickets")
    assert move is None and index.aliases["production"] == 1
    assert index.get(2).decision.reason == "gates passed; rejected" and not index.get(2).decision.promote
    shown = registry.describe("show", "tickets", "2")  # `python flows/registry.py show tickets 2`
    assert "production: not promoted (passes): gates passed; rejected" in shown
    assert "| metric | base | champion v1 | candidate | delta |" in shown and "| accuracy | - | - | 0.9500 | - |" in shown


def test_a_gate_profile_can_ask_for_approval(tmp_path):
    gates = tmp_path / "gates.yaml"
    gates.write_text("profiles:\n  dev:\n    accuracy: 0.5\n  production:\n    approval: required\n"
                     "    accuracy: {threshold: 0.9}\n")
    assert load_gate_profile(gates, "production").approval == "required"
    assert set(load_gate_profile(gates, "production").gates) == {"accuracy"}
    assert SingleParams(dataset={"path": "d.csv"}, gates_file=str(gates), gate_profile="production").approval_in_force \
        == "required"
    assert SingleParams(dataset={"path": "d.csv"}, gates_file=str(gates), gate_profile="dev").approval_in_force == "none"
    gates.write_text("profiles:\n  production:\n    approval: sometimes\n")
    with pytest.raises(ValueError, match="profiles.production.approval"):
        SingleParams(dataset={"path": "d.csv"}, gates_file=str(gates), gate_profile="production")


def _paused_run(api: str, output_dir: str, timeout: float = 240) -> dict:
    """This test's `single` flow run once it is paused (the session's server also holds other tests' runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}},
                          timeout=30).json()
        mine = [r for r in runs if r["parameters"].get("params", {}).get("output_dir") == output_dir]
        if mine:
            return mine[0]
        time.sleep(1)
    pytest.fail(f"no paused run of {output_dir} within {timeout}s")


def test_a_bare_run_pauses_for_approval_times_out_unpromoted_then_is_approved_over_rest(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from flows.single import single

    waiting = classification_params(tmp_path, approval="required", approval_timeout_s=3)
    timed_out = single(waiting, return_state=True)
    assert timed_out.is_completed(), timed_out.message
    result = timed_out.result()
    registry = Registry(waiting.registry_root)
    assert result.registry_version == 1 and result.promotion.awaiting_approval
    assert "production" not in registry.index("reviews").aliases, "no answer: registered, not promoted"

    api, answered = PREFECT_API_URL.value(), {}
    patient = waiting.model_copy(update={"approval_timeout_s": 300})
    context = contextvars.copy_context()  # the test server's settings travel with the thread
    thread = threading.Thread(target=context.run,
                              args=(lambda: answered.update(state=single(patient, return_state=True)),))
    thread.start()
    try:
        paused = _paused_run(api, patient.output_dir)
        form = httpx.post(f"{api}/flow_runs/{paused['id']}/input/filter",
                          json={"prefix": "paused-approval-reviews-v1", "limit": 10}, timeout=30).json()
        description = next(json.loads(item["value"]) for item in form if item["key"].endswith("-description"))
        assert description.startswith("### Promote reviews v1 to `production`?") and "| accuracy |" in description
        response = resume_run(api, paused["id"], {"decision": "approve", "comment": "looks good"})
        assert response.status_code in (200, 201) and response.json()["status"] == "ACCEPT", response.text
    finally:
        thread.join(timeout=120)
    assert not thread.is_alive() and answered["state"].is_completed(), answered["state"].message
    result = answered["state"].result()
    assert result.cached["train"] is True, "answering trains nothing again"
    assert result.promotion.promote and result.promotion.approval.comment == "looks good"
    assert registry.index("reviews").aliases["production"] == 1
    on_disk = json.loads(Path(result.paths["result"]).read_text())
    assert on_disk["promotion"]["reason"] == "gates passed; no production version yet; approved (looks good)"
