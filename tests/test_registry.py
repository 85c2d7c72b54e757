"""The file registry: idempotent versions, aliases with rollback, safe under concurrency."""

import json
import multiprocessing
import os
import shutil
import stat

import pytest

from loraflow.errors import ConfigError, RegistryError
from loraflow.layout import atomic_write_text
from loraflow.registry import Registry


def _adapter(path, content="weights"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_text(content)
    return path


def test_register_is_idempotent_per_key(tmp_path):
    registry = Registry(tmp_path / "reg")
    adapter = _adapter(tmp_path / "a")
    first, created = registry.register("topics", adapter, "key-1", {"task": "x"}, {"accuracy": 0.9}, True)
    again, created_again = registry.register("topics", adapter, "key-1", {"task": "x"}, {"accuracy": 0.9}, True)
    second, _ = registry.register("topics", adapter, "key-2", {}, {}, False)
    assert (created, created_again) == ("created", "found")
    assert len(again.verdicts) == 1
    assert (first.version, again.version, second.version) == (1, 1, 2)
    card = json.loads((tmp_path / "reg" / "topics" / "v1" / "card.json").read_text())
    assert card["key"] == "key-1" and (tmp_path / "reg" / "topics" / "v1" / "adapter_model.safetensors").exists()


def test_versions_are_frozen_copies(tmp_path):
    registry = Registry(tmp_path / "reg")
    adapter = _adapter(tmp_path / "a", "old")
    version, _ = registry.register("n", adapter, "k", {}, {}, True)
    (adapter / "adapter_model.safetensors").write_text("new")
    assert (tmp_path / "reg" / "n" / "v1" / "adapter_model.safetensors").read_text() == "old"
    assert version.path.endswith("v1")


def test_promote_and_rollback(tmp_path):
    registry = Registry(tmp_path / "reg")
    adapter = _adapter(tmp_path / "a")
    for key in ("k1", "k2"):
        version, _ = registry.register("n", adapter, key, {}, {}, True)
        registry.promote("n", version.version, "production")
    assert registry.resolve("n", "production").version == 2
    assert registry.rollback("n", "production").version == 1
    assert registry.resolve("n", "production").version == 1
    with pytest.raises(ConfigError, match="no earlier version"):
        registry.rollback("n", "production")
    with pytest.raises(ConfigError, match="no version 9"):
        registry.promote("n", 9, "production")


def test_refuses_unsafe_names_and_empty_adapters(tmp_path):
    registry = Registry(tmp_path / "reg")
    with pytest.raises(ValueError, match="not a safe folder name"):
        registry.register("../x", _adapter(tmp_path / "a"), "k", {}, {}, True)
    with pytest.raises(ConfigError, match="holds no adapter"):
        registry.register("n", tmp_path, "k", {}, {}, True)


def test_other_gates_add_a_verdict_and_only_a_passing_one_moves_the_alias(tmp_path):
    registry = Registry(tmp_path / "reg")
    adapter = _adapter(tmp_path / "a")
    strict, _ = registry.register("n", adapter, "k", {}, {"accuracy": 0.7}, False, {"accuracy": 0.9}, "production")
    assert "production" not in registry.index("n").aliases
    with pytest.raises(ConfigError, match="never passed its gates"):
        registry.promote("n", 1, "production")
    lenient, _ = registry.register("n", adapter, "k", {}, {"accuracy": 0.7}, True, {"accuracy": 0.5}, "production",
                                   flow_run_id="run-2")
    index = registry.index("n")
    version = index.versions[0]
    assert [(v.number, v.gates, v.passed) for v in version.verdicts] == [
        (1, {"accuracy": 0.9}, False), (2, {"accuracy": 0.5}, True)]
    assert (version.passed, version.verdict, version.verdicts[1].flow_run_id) == (True, 2, "run-2")
    assert index.aliases["production"] == 1
    assert [(m.version, m.verdict, m.how) for m in index.alias_moves["production"]] == [(1, 2, "promote")]


def test_a_version_written_before_verdicts_reads_as_one_verdict(tmp_path):
    registry = Registry(tmp_path / "reg")
    registry.register("n", _adapter(tmp_path / "a"), "k", {}, {"accuracy": 0.8}, True)
    index_path = tmp_path / "reg" / "n" / "index.json"
    old = json.loads(index_path.read_text())
    for version in old["versions"]:
        for field in ("verdicts", "verdict", "files", "adapter_fingerprint"):
            del version[field]
    index_path.write_text(json.dumps(old))
    version = registry.resolve("n", 1)
    assert [(v.gates, v.passed, v.metrics) for v in version.verdicts] == [(None, True, {"accuracy": 0.8})]


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_version_folder_is_restored_from_the_same_adapter(tmp_path, damage):
    registry = Registry(tmp_path / "reg")
    adapter = _adapter(tmp_path / "a")
    version, _ = registry.register("n", adapter, "k", {}, {}, True)
    folder = tmp_path / "reg" / "n" / "v1"
    if damage == "delete":
        shutil.rmtree(folder)
    else:
        (folder / "adapter_model.safetensors").write_text("w")
    with pytest.raises(RegistryError, match=f"registry: {folder} \\(v1 of n\\) (is missing|holds adapter_model.+); re-run"):
        registry.resolve("n", 1)
    assert registry.damage("n", "k") is not None
    again, outcome = registry.register("n", adapter, "k", {}, {}, True)
    assert (outcome, again.version) == ("restored", 1)
    assert (folder / "adapter_model.safetensors").read_text() == "weights" and registry.damage("n", "k") is None
    assert registry.resolve("n", 1).path == str(folder)


def test_a_damaged_version_folder_is_not_restored_from_other_bytes(tmp_path):
    registry = Registry(tmp_path / "reg")
    registry.register("n", _adapter(tmp_path / "a"), "k", {}, {}, True)
    shutil.rmtree(tmp_path / "reg" / "n" / "v1")
    other = _adapter(tmp_path / "b", "other weights")
    with pytest.raises(RegistryError, match="is missing, and .+ is not the adapter registered there; restore"):
        registry.register("n", other, "k", {}, {}, True)


def test_outputs_honour_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        registry = Registry(tmp_path / "reg")
        adapter = _adapter(tmp_path / "a")
        os.chmod(adapter / "adapter_model.safetensors", 0o600)  # a run folder's own modes do not travel
        version, _ = registry.register("n", adapter, "k", {}, {}, True)
        written = atomic_write_text(tmp_path / "out.txt", "x")
    finally:
        os.umask(previous)
    folder = tmp_path / "reg" / "n" / "v1"
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in
             (written, folder, folder / "adapter_model.safetensors", folder / "card.json", folder.parent / "index.json")}
    assert modes == {"out.txt": 0o640, "v1": 0o750, "adapter_model.safetensors": 0o640, "card.json": 0o640,
                     "index.json": 0o640}


def _register_many(root, adapter, worker):
    registry = Registry(root)
    for i in range(5):
        version, _ = registry.register("shared", adapter, f"{worker}-{i}", {}, {}, True)
        registry.promote("shared", version.version, "production")


def test_concurrent_writers_lose_no_update(tmp_path):
    adapter = _adapter(tmp_path / "a")
    context = multiprocessing.get_context("spawn")  # fork after torch threads start can hang
    workers = [context.Process(target=_register_many, args=(tmp_path / "reg", adapter, w)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    index = Registry(tmp_path / "reg").index("shared")
    assert sorted(v.version for v in index.versions) == list(range(1, 21))
    assert len({v.key for v in index.versions}) == 20
    assert index.aliases["production"] in range(1, 21)


def _promote_and_roll_back(root, versions):
    """Promote each of `versions` in turn, rolling back after every second one."""
    registry = Registry(root)
    for position, version in enumerate(versions):
        registry.promote("shared", version, "production")
        if position % 2:
            registry.rollback("shared", "production")


def _read_while_written(root, stop_at):
    """A reader never sees a half-written index nor an alias pointing at a missing version."""
    import time

    registry = Registry(root)
    while time.time() < stop_at:
        index = registry.index("shared")
        assert index.aliases["production"] in {v.version for v in index.versions}
        registry.resolve("shared", "production")  # raises on a dangling alias


def test_concurrent_promotions_and_rollbacks_lose_no_history_and_readers_see_whole_indexes(tmp_path):
    import time

    registry = Registry(tmp_path / "reg")
    adapter = _adapter(tmp_path / "a")
    for key in range(25):
        registry.register("shared", adapter, f"k{key}", {}, {}, True)
    registry.promote("shared", 25, "production")
    context = multiprocessing.get_context("spawn")
    writers = [
        context.Process(target=_promote_and_roll_back, args=(tmp_path / "reg", list(range(1 + 8 * w, 9 + 8 * w))))
        for w in range(3)
    ]
    reader = context.Process(target=_read_while_written, args=(tmp_path / "reg", time.time() + 4))
    for process in (reader, *writers):
        process.start()
    for process in (*writers, reader):
        process.join(timeout=90)
        assert process.exitcode == 0
    index = Registry(tmp_path / "reg").index("shared")
    promotions, rollbacks = 3 * 8, 3 * 4
    assert len(index.alias_history["production"]) == promotions - rollbacks
    assert index.aliases["production"] in range(1, 26)


CARD = {"dataset_fingerprint": "data-1", "model_identity": "minilm"}


def _better(metrics, **extra):
    """The request of a run with one accuracy gate under `promote_if: better`."""
    from loraflow.gates import check_gates
    from loraflow.promotion import PromotionRequest

    return PromotionRequest(rule="better", verdicts=check_gates(metrics, {"accuracy": 0.1}),
                            baseline={"accuracy": 0.2}, **extra)


def _register_candidates(root, adapter, worker, accuracies):
    registry = Registry(root)
    for i, accuracy in enumerate(accuracies):
        metrics = {"accuracy": accuracy}
        registry.register("shared", adapter, f"{worker}-{i}", CARD, metrics, True, {"accuracy": 0.1}, "production",
                          promotion=_better(metrics))


def test_concurrent_promotions_under_better_end_with_the_best_and_every_move_an_improvement(tmp_path):
    registry = Registry(tmp_path / "reg")
    adapter = _adapter(tmp_path / "a")
    registry.register("shared", adapter, "champion", CARD, {"accuracy": 0.5}, True, alias="production")
    accuracies = [[0.61, 0.93, 0.70], [0.88, 0.64, 0.97], [0.72, 0.95, 0.66], [0.90, 0.69, 0.81]]
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_register_candidates, args=(tmp_path / "reg", adapter, w, values))
               for w, values in enumerate(accuracies)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    index = registry.index("shared")
    by_version = {v.version: v.metrics["accuracy"] for v in index.versions}
    assert len(by_version) == 13
    assert by_version[index.aliases["production"]] == 0.97  # the one winner the rule picks, whatever the order
    moved = [by_version[move.version] for move in index.alias_moves["production"]]
    assert moved == sorted(moved) and len(set(moved)) == len(moved), "every move beat the version it replaced"
    for version in index.versions[1:]:
        decision = version.decision
        assert decision.rule == "better" and decision.champion is not None
        assert decision.promote == (version.version in {m.version for m in index.alias_moves["production"]})


def _crash_while_writing_the_index(root, adapter):
    """Die the way a killed process does, at the rename that commits the index."""
    os.replace = lambda *args: os._exit(3)
    metrics = {"accuracy": 0.9}
    Registry(root).register("n", adapter, "k2", CARD, metrics, True, {"accuracy": 0.1}, "production",
                            promotion=_better(metrics))


def test_a_crash_between_registering_and_moving_the_alias_leaves_both_undone(tmp_path):
    registry = Registry(tmp_path / "reg")
    adapter = _adapter(tmp_path / "a")
    registry.register("n", adapter, "k1", CARD, {"accuracy": 0.5}, True, alias="production")
    before = (tmp_path / "reg" / "n" / "index.json").read_text()
    child = multiprocessing.get_context("spawn").Process(target=_crash_while_writing_the_index,
                                                          args=(tmp_path / "reg", adapter))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 3
    assert (tmp_path / "reg" / "n" / "index.json").read_text() == before  # alias where it was, no half version
    assert registry.resolve("n", "production").version == 1
    metrics = {"accuracy": 0.9}
    version, outcome = registry.register("n", adapter, "k2", CARD, metrics, True, {"accuracy": 0.1}, "production",
                                         promotion=_better(metrics))
    assert (outcome, version.version, registry.index("n").aliases["production"]) == ("created", 2, 2)
    assert version.decision.reason == "better than production v1: accuracy +0.4000"


def test_a_champion_of_other_data_blocks_better_unless_evaluated_on_this_split(tmp_path):
    from loraflow.promotion import Champion

    registry = Registry(tmp_path / "reg")
    adapter = _adapter(tmp_path / "a")
    registry.register("n", adapter, "k1", {**CARD, "dataset_fingerprint": "old"}, {"accuracy": 0.5}, True,
                      alias="production")
    metrics = {"accuracy": 0.9}
    held, _ = registry.register("n", adapter, "k2", CARD, metrics, True, alias="production",
                                promotion=_better(metrics))
    assert not held.decision.promote and "production v1 cannot be evaluated: its record is of other data" in \
        held.decision.reason
    offered = Champion(version=1, metrics={"accuracy": 0.6})
    taken, _ = registry.register("n", adapter, "k3", CARD, metrics, True, alias="production",
                                 promotion=_better(metrics, champion=offered))
    assert taken.decision.promote and registry.index("n").aliases["production"] == 3
    move = registry.index("n").alias_moves["production"][-1]
    assert (move.previous, move.comment) == (1, "better than production v1: accuracy +0.3000")


def test_manual_moves_record_who_and_why(tmp_path):
    registry = Registry(tmp_path / "reg")
    adapter = _adapter(tmp_path / "a")
    for key in ("k1", "k2"):
        registry.register("n", adapter, key, {}, {}, True)
    registry.promote("n", 1, "production", flow_run_id="run-1")
    move = registry.promote("n", 2, "production", flow_run_id="run-2", comment="hotfix")
    assert (move.version, move.previous, move.flow_run_id, move.comment) == (2, 1, "run-2", "hotfix")
    assert registry.promote("n", 2, "production") is None
    registry.rollback("n", "production", flow_run_id="run-3", comment="bad answers")
    last = registry.index("n").alias_moves["production"][-1]
    assert (last.how, last.version, last.previous, last.comment) == ("rollback", 1, 2, "bad answers")
    assert registry.names() == ["n"]
