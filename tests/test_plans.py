"""Execution plans (`plan_only: true`, `--plan`) for all three modes: validated, printed and
returned without training, with row counts, names, settings, steps, paths and cache status."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter

from flows.batch import batch
from flows.cli import run_from_command_line
from flows.single import single
from flows.variations import demo_params, variations
from loraflow.config import BatchParams, SingleParams
from loraflow.dry_run import CACHED, PREPARED_NOW, WILL_RUN, DryRun
from tests.test_flow_batch import three_datasets
from tests.test_flow_single import FAST_CLASSIFICATION, write_messy_csv
from tests.tiny_models import easy_classification_examples

REPO = Path(__file__).resolve().parents[1]
TRAINING_STAGES = ("train", "evaluate", "samples", "register")


def single_params(tmp_path: Path, **changes) -> SingleParams:
    data = write_messy_csv(tmp_path / "reviews.csv", easy_classification_examples(90, seed=1))
    return SingleParams(**{"dataset": {"path": str(data)}, "overrides": {**FAST_CLASSIFICATION, "num_epochs": 1},
                           "gates": {"accuracy": 0.5}, "output_dir": str(tmp_path / "runs"), "shard_size": 40,
                           "plan_only": True, **changes})


def nothing_trained(output_dir: str | Path) -> bool:
    return not list(Path(output_dir).rglob("adapter_model.safetensors")) and not list(Path(output_dir).rglob("checkpoint-*"))


def task_run_names(state) -> list[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]}))
    return [run.name for run in runs]


def test_a_single_plan_prepares_counts_and_estimates_but_trains_nothing(prefect_server, tmp_path):
    params = single_params(tmp_path)
    state = single(params, return_state=True)
    assert state.is_completed() and state.message == "plan only: 1 training run(s) planned, nothing trained"
    plan = state.result()
    assert isinstance(plan, DryRun) and plan.mode == "single"
    [dataset], [run] = plan.datasets, plan.runs
    assert dataset.counts == {"train": 49, "validation": 8, "test": 8, "rejected": 25}
    assert dataset.stages == {"prepare": PREPARED_NOW, "tokenize": WILL_RUN, "baseline": WILL_RUN}
    assert run.name == "reviews" and run.output == str(Path(params.output_dir).resolve() / "reviews")
    assert run.settings.learning_rate == FAST_CLASSIFICATION["learning_rate"] and run.settings.lora.r == 8
    assert run.steps == math.ceil(49 / FAST_CLASSIFICATION["batch_size"]) * 1
    assert run.stages == dict.fromkeys(TRAINING_STAGES, WILL_RUN)
    assert plan.outputs == {"result": str(Path(run.output) / "result.json")}
    assert nothing_trained(params.output_dir)
    assert sorted(p.name for p in Path(run.output).iterdir()) == ["data"]  # no run folders made by a plan
    assert [name for name in task_run_names(state) if not name.startswith("prepare-dataset")] == []


def test_after_a_run_the_plan_shows_what_the_cache_serves(prefect_server, tmp_path):
    params = single_params(tmp_path)
    assert single(params.model_copy(update={"plan_only": False}), return_state=True).is_completed()
    same = single(params, return_state=True).result()
    assert same.datasets[0].stages == dict.fromkeys(("prepare", "tokenize", "baseline"), CACHED)
    assert same.runs[0].stages == dict.fromkeys(TRAINING_STAGES, CACHED)

    changed = single(params.model_copy(update={"overrides": {**params.overrides, "learning_rate": 0.02}}),
                     return_state=True).result()
    # a training setting cannot change the bare model's scores: the baseline stays cached
    assert changed.datasets[0].stages == {"prepare": CACHED, "tokenize": CACHED, "baseline": CACHED}
    # production holds the first run's adapter now: the changed run evaluates it on its own test split too
    assert changed.runs[0].stages == dict.fromkeys(("train", "evaluate", "samples", "champion", "register"), WILL_RUN)

    shutil.rmtree(Path(params.output_dir) / "reviews" / "model")
    deleted = single(params, return_state=True).result()
    assert deleted.runs[0].stages["train"] == WILL_RUN  # a cache hit naming deleted files is recomputed


def test_a_batch_plan_lists_every_dataset_and_fails_naming_the_malformed_one(prefect_server, tmp_path):
    data = three_datasets(tmp_path / "data")
    params = BatchParams(datasets=[{"path": str(path)} for path in data.values()], plan_only=True,
                         overrides=FAST_CLASSIFICATION, output_dir=str(tmp_path / "runs"), name="nightly")
    state = batch(params, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("plan: 1 dataset(s) cannot run: broken: ")
    plan = state.result(raise_on_failure=False)
    assert [(d.name, bool(d.counts), d.error is None) for d in plan.datasets] == [
        ("alpha", True, True), ("broken", False, False), ("beta", True, True)]
    assert [run.name for run in plan.runs] == ["alpha", "beta"]
    assert plan.outputs == {"batch result": str((tmp_path / "runs" / "nightly" / "batch_result.json").resolve())}
    assert "strategy: parallel, 2 dataset(s) at a time; continue past failure" in plan.text()
    assert nothing_trained(params.output_dir) and not (tmp_path / "runs" / "nightly").exists()


def test_a_variations_plan_names_every_variant_with_its_settings_and_steps(prefect_server, tmp_path):
    params = demo_params(output_dir=str(tmp_path / "runs")).model_copy(update={"plan_only": True})
    state = variations(params, return_state=True)
    assert state.is_completed(), state.message
    plan = state.result()
    root = (tmp_path / "runs" / "topics-variations").resolve()
    assert [(run.values, run.settings.learning_rate, run.settings.lora.r) for run in plan.runs] == [
        ({"learning_rate": lr, "lora.r": r}, lr, r) for lr in (0.001, 0.003) for r in (4, 8)]
    assert [run.output for run in plan.runs] == [str(root / run.name) for run in plan.runs]
    train_rows = plan.datasets[0].counts["train"]
    assert {run.steps for run in plan.runs} == {math.ceil(train_rows / 16) * 2}
    assert {run.stages["register"] for run in plan.runs} == {"best variant only"}
    assert plan.outputs["leaderboard"] == str(root / "leaderboard.csv")
    assert sorted(p.name for p in root.iterdir()) == ["data"]
    assert "ranked by accuracy; the best variant that passes its gates is registered as 'topics'" in plan.text()


def test_plan_on_the_command_line_prints_the_plan(prefect_server, tmp_path, capsys):
    """In-process for single; the real script, as a user runs it, for variations."""
    params = single_params(tmp_path, plan_only=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(exclude_defaults=True)))
    assert run_from_command_line(single, SingleParams, lambda: params, argv=[str(params_file), "--plan"]) == 0
    printed = capsys.readouterr().out
    assert "plan: single 'reviews': 1 training run(s); a plan trains nothing" in printed
    assert "rows: train 49, validation 8, test 8, rejected 25" in printed
    assert nothing_trained(params.output_dir)

    grid_file = tmp_path / "grid.yaml"
    grid = {"dataset": {"path": str(tmp_path / "reviews.csv")}, "grid": {"lora.r": [4, 8]},
            "name_template": "r{lora_r}", "output_dir": str(tmp_path / "grid-runs")}
    grid_file.write_text(yaml.safe_dump(grid))
    from prefect.settings import PREFECT_API_URL

    run = subprocess.run([sys.executable, str(REPO / "flows" / "variations.py"), str(grid_file), "--plan"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    assert run.returncode == 0, run.stderr
    assert "plan: variations 'reviews-variations': 2 training run(s)" in run.stdout
    assert "run r4  (lora.r=4)" in run.stdout and "run r8  (lora.r=8)" in run.stdout
    assert "LoRA r 8 alpha 16 dropout 0.05 on query,value; 24 optimiser steps" in run.stdout
    assert nothing_trained(tmp_path / "grid-runs")
