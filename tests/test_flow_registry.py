"""The registry through the `single` flow, as a user meets it: the same adapter re-run under other
gates, a version folder deleted by hand, outputs readable by the team, and a LoRA change that
keeps the baseline."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

from flows.single import single
from loraflow.registry import Registry
from tests.test_flow_single import FAST_CLASSIFICATION, classification_params

ONE_EPOCH = {**FAST_CLASSIFICATION, "num_epochs": 1}


def test_rerun_under_other_gates_records_a_new_verdict_and_a_deleted_version_is_restored(prefect_server, tmp_path):
    strict = classification_params(tmp_path, gates={"accuracy": 1.01}, overrides=ONE_EPOCH)
    assert single(strict, return_state=True).is_failed()
    registry = Registry(strict.registry_root)
    assert "production" not in registry.index("reviews").aliases

    lenient = classification_params(tmp_path, gates={"accuracy": 0.0}, overrides=ONE_EPOCH)
    state = single(lenient, return_state=True)
    assert state.is_completed(), state.message
    assert state.result().cached["train"] is True  # the same adapter, judged again
    index = registry.index("reviews")
    (version,) = index.versions
    assert [(v.gates, v.passed) for v in version.verdicts] == [({"accuracy": 1.01}, False), ({"accuracy": 0.0}, True)]
    assert version.verdicts[1].flow_run_id is not None
    assert index.aliases["production"] == 1
    assert [(move.version, move.verdict) for move in index.alias_moves["production"]] == [(1, 2)]
    card = Path(version.path) / "card.json"
    assert stat.S_IMODE(card.stat().st_mode) & 0o044 == 0o044, "the registry is readable by the team"

    shutil.rmtree(version.path)
    state = single(lenient, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result.registry_version == 1 and (Path(result.registry_path) / "adapter_model.safetensors").is_file()
    assert registry.resolve("reviews", "production").path == result.registry_path
    assert len(registry.index("reviews").versions[0].verdicts) == 2  # the same verdict, not a third


def test_a_change_of_lora_settings_keeps_the_baseline(prefect_server, tmp_path):
    first = single(classification_params(tmp_path, overrides=ONE_EPOCH, gates={}), return_state=True)
    changed = classification_params(tmp_path, overrides={**ONE_EPOCH, "lora.r": 4}, gates={})
    second = single(changed, return_state=True)
    assert first.is_completed() and second.is_completed(), second.message
    result = second.result()
    assert result.cached["baseline"] is True and result.cached["train"] is False
    assert result.baseline == first.result().baseline


def test_a_better_run_takes_production_and_a_worse_one_is_registered_but_does_not(prefect_server, tmp_path):
    from loraflow.report import summary_markdown

    gates_file = tmp_path / "gates.yaml"
    gates_file.write_text("profiles:\n  staging:\n    accuracy: 0.0\n"
                          "    f1_macro: {threshold: 0.99, severity: warning}\n")

    def barely_trained(**changes):
        return classification_params(tmp_path, gates={}, gates_file=str(gates_file), gate_profile="staging",
                                     overrides={**ONE_EPOCH, "learning_rate": 1e-7}, **changes)

    weak = single(barely_trained(seed=7), return_state=True)
    assert weak.is_completed(), weak.message
    assert weak.result().promotion.promote, "no production version yet: the first passing run takes it"
    first = single(classification_params(tmp_path), return_state=True)
    assert first.is_completed(), first.message
    better = first.result()
    assert better.registry_version == 2 and better.promotion.promote and better.promotion.champion == 1
    assert better.promotion.reason.startswith("better than production v1: accuracy +")
    assert Registry(tmp_path / "runs" / "registry").index("reviews").aliases["production"] == 2
    side_by_side = f"| accuracy | {better.baseline['accuracy']:.4f} | {weak.result().metrics['accuracy']:.4f} | " \
                   f"{better.metrics['accuracy']:.4f} |"
    assert "| metric | base | champion v1 | candidate | delta |" in summary_markdown(better)
    assert side_by_side in summary_markdown(better)

    second = single(barely_trained(), return_state=True)
    assert second.is_completed(), second.message  # the failed warning gate does not fail the run
    result = second.result()
    assert (result.registry_version, Registry(tmp_path / "runs" / "registry").index("reviews").aliases["production"]) \
        == (3, 2)
    assert not result.promotion.promote and result.promotion.champion == 2
    assert result.cached["champion"] is False  # production's adapter was evaluated on this run's own test split
    assert json.loads((Path(result.paths["result"]).parent / "eval" / "champion.json").read_text())["accuracy"] \
        == result.promotion.comparison[0].champion
    assert result.promotion.reason.startswith("not better than production v2 by 0.0: accuracy -")
    row = result.promotion.comparison[0]
    assert (row.metric, row.champion, row.candidate) == ("accuracy", first.result().metrics["accuracy"],
                                                         result.metrics["accuracy"])
    on_disk = json.loads(Path(result.paths["result"]).read_text())
    assert on_disk["gates"]["f1_macro"]["severity"] == "warning" and on_disk["gates"]["f1_macro"]["profile"] == "staging"
    assert on_disk["promotion"]["reason"] == result.promotion.reason
