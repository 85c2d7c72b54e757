"""The promotion rule and gate profiles, in the core alone: which alias a result gets, and why."""

import pytest

from loraflow.config import SingleParams
from loraflow.errors import ConfigError
from loraflow.gates import Gate, check_gates, gates_pass, load_gate_profile
from loraflow.promotion import Champion, PromotionRequest, decide

BASE = {"accuracy": 0.3, "f1_macro": 0.2, "perplexity": 90.0}


def _decide(candidate, champion=None, rule="better", gates=None, passed=True, **extra):
    verdicts = check_gates(candidate, gates if gates is not None else {"accuracy": 0.5})
    request = PromotionRequest(rule=rule, verdicts=verdicts, baseline=BASE, **extra)
    return decide(request, "production", passed, candidate, champion)


@pytest.mark.parametrize("candidate, champion, rule, extra, promote, reason", [
    ({"accuracy": 0.9}, None, "better", {}, True, "gates passed; no production version yet"),
    ({"accuracy": 0.9}, {"accuracy": 0.8}, "better", {}, True, "better than production v1: accuracy +0.1000"),
    ({"accuracy": 0.7}, {"accuracy": 0.8}, "better", {}, False,
     "not better than production v1 by 0.0: accuracy -0.1000"),
    ({"accuracy": 0.8}, {"accuracy": 0.8}, "better", {}, False, "not better than production v1 by 0.0: no metric improves"),
    ({"accuracy": 0.82}, {"accuracy": 0.8}, "better", {"min_improvement": 0.05}, False,
     "not better than production v1 by 0.05: accuracy +0.0200"),
    ({"accuracy": 0.7}, {"accuracy": 0.8}, "passes", {}, True, "gates passed"),
    ({"accuracy": 0.9}, None, "never", {}, False, "promote_if: never"),
    ({"accuracy": 0.9}, {"accuracy": 0.8}, "better", {"approval": "required"}, False,
     "better than production v1: accuracy +0.1000; held for approval (approval: required)"),
])
def test_the_rule_decides_in_one_line(candidate, champion, rule, extra, promote, reason):
    decision = _decide(candidate, Champion(version=1, metrics=champion) if champion else None, rule, **extra)
    assert (decision.promote, decision.reason) == (promote, reason)


def test_lower_is_better_and_never_worse_than_the_base():
    champion = Champion(version=2, metrics={"perplexity": 40.0, "accuracy": 0.1})
    assert _decide({"perplexity": 35.0}, champion, gates={"perplexity": 50}).promote
    assert not _decide({"perplexity": 45.0}, champion, gates={"perplexity": 50}).promote
    worse = _decide({"accuracy": 0.25}, Champion(version=2, metrics={"accuracy": 0.2}), gates={"accuracy": 0.1})
    assert (worse.promote, worse.reason) == (False, "worse than the base model on accuracy")


def test_failed_gates_and_an_unevaluable_champion_block_promotion():
    failed = _decide({"accuracy": 0.4}, passed=False)
    assert (failed.promote, failed.reason) == (False, "critical gates failed: accuracy")
    gone = _decide({"accuracy": 0.9}, Champion(version=3, unavailable="its files were deleted"))
    assert (gone.promote, gone.reason) == (
        False, "production v3 cannot be evaluated: its files were deleted; promote_if: passes would promote on the "
               "gates alone")


def test_the_comparison_table_has_base_champion_candidate_and_delta():
    decision = _decide({"accuracy": 0.9, "f1_macro": 0.8}, Champion(version=1, metrics={"accuracy": 0.8}),
                       gates={"accuracy": 0.5, "f1_macro": 0.1})
    assert [(r.metric, r.base, r.champion, r.candidate) for r in decision.comparison] == [
        ("accuracy", 0.3, 0.8, 0.9), ("f1_macro", 0.2, None, 0.8)]
    assert decision.comparison[0].delta == pytest.approx(0.1)
    assert "no f1_macro to compare" in decision.reason
    assert decision.table().splitlines()[2] == "| accuracy | 0.3000 | 0.8000 | 0.9000 | +0.1000 |"


GATES_FILE = """\
profiles:
  dev:
    accuracy: 0.5
  production:
    accuracy: {threshold: 0.9}
    f1_macro: {threshold: 0.95, severity: warning}
"""


def test_a_profile_selects_gates_with_severities_and_a_failing_warning_does_not_fail(tmp_path):
    path = tmp_path / "gates.yaml"
    path.write_text(GATES_FILE)
    params = SingleParams(dataset={"path": "d.csv"}, gates_file=str(path), gate_profile="production",
                          gates={"precision": 0.1})
    assert params.gate_set == {"accuracy": Gate(threshold=0.9), "f1_macro": Gate(threshold=0.95, severity="warning"),
                               "precision": 0.1}
    verdicts = check_gates({"accuracy": 0.92, "f1_macro": 0.9, "precision": 0.5}, params.gate_set, params.gate_profile)
    assert [(v.metric, v.passed, v.severity, v.profile) for v in verdicts] == [
        ("accuracy", True, "critical", "production"), ("f1_macro", False, "warning", "production"),
        ("precision", True, "critical", None)]
    assert gates_pass(verdicts) and params.gate_thresholds == {"accuracy": 0.9, "f1_macro": 0.95, "precision": 0.1}
    assert not gates_pass(check_gates({"accuracy": 0.8}, params.gate_set))


@pytest.mark.parametrize("content, profile, expected", [
    (GATES_FILE, "prod", "no gate profile 'prod' (did you mean 'production'?)"),
    ("profiles:\n  dev:\n    acuracy: 0.5\n", "dev", "profiles.dev.acuracy: unknown gate metric (did you mean 'accuracy'?)"),
    ("profiles:\n  dev:\n    accuracy: {threshold: 0.5, severity: fatal}\n", "dev", "profiles.dev.accuracy: "),
    ("gates:\n  accuracy: 0.5\n", "dev", "profiles: Field required"),
    ("profiles: [", "dev", "gates.yaml:1: not valid YAML"),
])
def test_a_bad_gates_file_is_one_line(tmp_path, content, profile, expected):
    path = tmp_path / "gates.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_gate_profile(path, profile)
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("fields, expected", [
    ({"gate_profile": "dev"}, "gate_profile and gates_file must be given together"),
    ({"gate_profile": "dev", "gates_file": "missing.yaml"}, "gates_file missing.yaml: not found"),
    ({"promote_if": "always"}, "promote_if"),
    ({"min_improvement": -0.1}, "min_improvement"),
    ({"approval": "maybe"}, "approval"),
])
def test_promotion_parameters_are_validated(fields, expected):
    with pytest.raises(ValueError, match=expected):
        SingleParams(dataset={"path": "d.csv"}, **fields)


def test_summaries_show_warnings_and_the_decision():
    from loraflow.html_report import run_report_html
    from loraflow.report import RunResult, summary_markdown, summary_text

    gates = {v.metric: v for v in check_gates({"accuracy": 0.9, "f1_macro": 0.5},
                                              {"accuracy": 0.5, "f1_macro": Gate(threshold=0.8, severity="warning")},
                                              "staging")}
    decision = _decide({"accuracy": 0.9}, Champion(version=1, metrics={"accuracy": 0.95}))
    result = RunResult(name="t", status="passed", task="sequence-classification", model="minilm", model_path="m",
                       passed=gates_pass(gates.values()), metrics={"accuracy": 0.9, "f1_macro": 0.5}, baseline=BASE,
                       gates=gates, adapter_path="a", registry_version=2, registry_path="r", timings={}, cached={},
                       promotion=decision)
    text = summary_text(result)
    assert "  gate: f1_macro 0.5000 >= 0.8 WARN (warning, profile staging)" in text
    assert ("  promotion: production not moved (promote_if: better): not better than production v1 by 0.0: "
            "accuracy -0.0500") in text
    assert result.passed and not result.failed_gates
    assert "| accuracy | 0.3000 | 0.9500 | 0.9000 | -0.0500 |" in summary_markdown(result)
    html = run_report_html(result, {}, {})
    assert "<th>champion v1</th>" in html and "WARN (warning, profile staging)" in html


def test_a_champion_that_cannot_be_evaluated_says_why_in_one_line_without_loading_a_model(tmp_path):
    """Deleted files, another base model, other labels: the reason, not an evaluation that would fail."""
    import shutil

    from loraflow.fingerprint import code_version
    from loraflow.pipeline import evaluate_champion
    from loraflow.plan import ResolvedConfig
    from loraflow.registry import Registry
    from loraflow.settings import resolve_training_settings

    config = ResolvedConfig(name="tickets", task="sequence-classification", model="/models/a", model_identity="a",
                            preset="classification-small", labels=["bug", "question"],
                            settings=resolve_training_settings("classification-small", {}, "sequence-classification"),
                            dataset_fingerprint="d", train_rows=10, steps_per_epoch=1, total_steps=1, seed=1,
                            code_version=code_version())
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    registry = Registry(tmp_path / "registry")

    def champion(key: str, **card):
        base = {"model_identity": "a", "base_model": "/models/a", "config": {"labels": ["bug", "question"]}}
        version, _ = registry.register("tickets", adapter, key, {**base, **card}, {"accuracy": 0.9}, True)
        return version

    other_model = evaluate_champion(config, [], champion("k1", model_identity="b", base_model="/models/b"),
                                    tmp_path / "c.json")
    assert other_model.unavailable == "it adapts another base model (/models/b)" and other_model.metrics is None
    other_labels = evaluate_champion(config, [], champion("k2", config={"labels": ["bug", "feature"]}),
                                     tmp_path / "c.json")
    assert other_labels.unavailable == "it predicts other labels (['bug', 'feature'])"
    deleted = champion("k3")
    shutil.rmtree(deleted.path)
    gone = evaluate_champion(config, [], deleted, tmp_path / "c.json")
    assert gone.unavailable == f"its folder {deleted.path} is missing" and not (tmp_path / "c.json").exists()
