"""Variations core: grid and zip expansion, naming templates and their checks, ranking (no Prefect)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from loraflow.config import VariationsParams, load_params_file
from loraflow.errors import ConfigError
from loraflow.gates import GateVerdict
from loraflow.grid import expand_variations, rank_metric
from loraflow.report import RunOutcome, outcome_table, write_csv
from loraflow.variations import best_variant, leaderboard, variant_plans, variant_root

DATA = str(Path(__file__).resolve().parents[1] / "loraflow" / "sample_data" / "topics.csv")


def params(**changes) -> VariationsParams:
    return VariationsParams(**{"dataset": {"path": DATA}, **changes})


def test_a_2x2_grid_is_four_named_variants_with_their_overrides():
    variants = expand_variations(params(grid={"learning_rate": [0.001, 0.003], "lora.r": [4, 8]},
                                        overrides={"num_epochs": 2, "lora": {"alpha": 8}}))
    assert [v.name for v in variants] == [
        "topics_classification-small_learning_rate0.001-r4",
        "topics_classification-small_learning_rate0.001-r8",
        "topics_classification-small_learning_rate0.003-r4",
        "topics_classification-small_learning_rate0.003-r8",
    ]
    assert variants[1].values == {"learning_rate": 0.001, "lora.r": 8}
    assert variants[1].overrides == {"num_epochs": 2, "lora": {"alpha": 8, "r": 8}, "learning_rate": 0.001}


def test_zip_groups_vary_together_and_combine_with_the_grid():
    variants = expand_variations(params(grid={"lora.r": [4, 8]},
                                        zip=[{"learning_rate": [0.001, 0.01], "num_epochs": [6, 2]}],
                                        name_template="r{lora_r}-lr{learning_rate:.0e}-e{num_epochs}-{index}"))
    assert [v.name for v in variants] == ["r4-lr1e-03-e6-1", "r4-lr1e-02-e2-2", "r8-lr1e-03-e6-3", "r8-lr1e-02-e2-4"]
    assert {(v.values["learning_rate"], v.values["num_epochs"]) for v in variants} == {(0.001, 6), (0.01, 2)}


def test_no_grid_is_one_base_variant():
    assert [v.name for v in expand_variations(params())] == ["topics_classification-small_base"]


@pytest.mark.parametrize("changes, message", [
    ({"grid": {"learning_rate": [1, 2, 3], "lora.r": [1, 2, 3]}, "max_variations": 8},
     "grid: 9 variants exceed max_variations=8; shrink the grid or raise max_variations"),
    ({"zip": [{"learning_rate": [0.1, 0.2], "num_epochs": [1]}]},
     "zip.0: lists that vary together need the same length (got {'learning_rate': 2, 'num_epochs': 1})"),
    ({"grid": {"lora.r": [4]}, "zip": [{"lora.r": [8], "num_epochs": [1]}]},
     "zip.0: 'lora.r' is already varied by grid; vary each key in one place"),
    ({"grid": {"learning_rate": []}}, "grid.learning_rate: give at least one value"),
    ({"grid": {"learning_rate": [0.01, 0]}},
     "grid: variant 2 (learning_rate0): overrides.learning_rate: Input should be greater than 0"),
    ({"grid": {"lora.rank": [4]}}, "grid: variant 1 (rank4): overrides: unknown key 'lora.rank' (did you mean 'lora.r'?)"),
    ({"grid": {"lora.r": [4, 8]}, "name_template": "{dataset}_{rank}"},
     "name_template: unknown placeholder {rank}; use {dataset}, {preset}, {variation}, {index}, {lora_r}"),
    ({"grid": {"lora.r": [4, 8]}, "name_template": "{dataset}"},
     "name_template: '{dataset}' names variants 1 and 2 both 'topics'; include {variation}, {index} or the varied keys"),
    ({"grid": {"lora.target_modules": [["query", "value"]]}, "name_template": "../{variation}"},
     "name_template: variant 1's name '../target_modulesquery.value' is not a safe folder name"),
    ({"name_template": "team/{dataset}"}, "name_template: variant 1's name 'team/topics' is not a safe folder name"),
    ({"name_template": "data"}, "name_template: 'data' is the shared data folder; choose another template"),
    ({"name_template": "{dataset"}, "name_template: '{dataset' is not a valid template"),
    ({"metric": "perplexity"}, "metric: 'perplexity' is not reported for task 'sequence-classification'"),
])
def test_bad_grids_and_names_fail_before_anything_runs(changes, message):
    with pytest.raises(ValueError) as raised:
        params(**changes)
    assert message in str(raised.value)


def test_a_parameter_file_error_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(f"dataset: {{path: {DATA}}}\ngrid:\n  learning_rate: [0.01, 0.02]\nname_template: fixed\n")
    with pytest.raises(ConfigError) as raised:
        load_params_file(path, VariationsParams)
    assert str(raised.value) == (
        f"{path}: name_template: 'fixed' names variants 1 and 2 both 'fixed'; "
        "include {variation}, {index} or the varied keys"
    )


def test_rank_metric_defaults_by_task():
    assert rank_metric(params()) == "accuracy"
    assert rank_metric(params(metric="f1_macro")) == "f1_macro"
    causal = params(task="causal-lm", dataset={"path": DATA, "text_column": "text"})
    assert rank_metric(causal) == "eval_loss"


def test_variant_plans_give_each_variant_its_own_folder_without_creating_any(tmp_path):
    grid = params(grid={"lora.r": [4, 8]}, output_dir=str(tmp_path / "runs"), name="sweep")
    base, plans = variant_plans(grid)
    assert base.root == str(tmp_path / "runs" / "sweep")
    assert [(plan.name, plan.settings.lora.r) for _, plan in plans] == [
        ("topics_classification-small_r4", 4), ("topics_classification-small_r8", 8)]
    assert [plan.root for _, plan in plans] == [str(tmp_path / "runs" / "sweep" / plan.name) for _, plan in plans]
    assert plans[0][1].params.overrides == {"lora": {"r": 4}}
    assert not (tmp_path / "runs").exists()  # the model check is remembered in the user's cache, not here


def test_a_variant_folder_that_links_outside_the_output_root_is_refused(tmp_path):
    root, outside = tmp_path / "sweep", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "v1")
    assert variant_root(root, "v2") == root / "v2"
    with pytest.raises(ConfigError, match="resolves to .*elsewhere, outside .*sweep; remove that link"):
        variant_root(root, "v1")


def outcome(name: str, status: str = "passed", **metrics: float) -> RunOutcome:
    gates = {"accuracy": GateVerdict(metric="accuracy", threshold=0.8, value=metrics.get("accuracy"),
                                     higher_is_better=True, passed=status == "passed")}
    return RunOutcome(name=name, status=status, metrics=metrics, gates=gates if metrics else {},
                      values={"lora.r": len(name)}, seconds=1.5)


def test_leaderboard_ranks_by_the_metric_direction_and_the_best_passed_its_gates():
    outcomes = [outcome("a", accuracy=0.7, eval_loss=0.9, status="failed_gates"), outcome("bb", accuracy=0.9,
                eval_loss=0.5), outcome("broken", status="error"), outcome("ccc", accuracy=0.95, eval_loss=0.7,
                status="failed_gates")]
    by_accuracy = leaderboard(outcomes, "accuracy")
    assert [o.name for o in by_accuracy] == ["ccc", "bb", "a", "broken"]
    assert best_variant(by_accuracy).name == "bb"
    assert [o.name for o in leaderboard(outcomes, "eval_loss")] == ["bb", "ccc", "a", "broken"]


def test_the_leaderboard_table_has_one_column_per_value_metric_and_gate(tmp_path):
    rows = outcome_table([outcome("bb", accuracy=0.9), outcome("broken", status="error")])
    path = write_csv(rows, tmp_path / "leaderboard.csv")
    with open(path, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["name", "status", "lora.r", "accuracy", "gate accuracy", "seconds", "adapter",
                              "registry_version", "error"]
    assert table[0]["accuracy"] == "0.9" and table[0]["gate accuracy"] == "pass"
    assert table[1]["accuracy"] == "" and table[1]["status"] == "error"
