"""The registry through the `single` flow, as a user meets it: the same adapter re-run under other
gates, a version folder deleted by hand, outputs readable by the team, and a LoRA change that
keeps the baseline."""

from __future__ import annotations

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
