"""Metrics, gates and sample inference: by hand on known numbers, and on real (tiny) models."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoTokenizer

from loraflow.evaluate import classification_report, evaluate_model
from loraflow.gates import check_gates
from loraflow.layout import read_jsonl
from loraflow.metrics import metrics_for_task
from loraflow.models import bundled_minilm_dir
from loraflow.samples import run_sample_prompts
from loraflow.settings import LoraSettings, TrainingSettings
from loraflow.train.request import TrainRequest
from loraflow.train.trainer import train_adapter
from tests import tiny_models as tiny
from tests.tiny_models import EASY_LABELS

CLASSIFICATION = "sequence-classification"


def verdicts(metrics: dict, gates: dict[str, float]) -> dict[str, tuple[float | None, bool]]:
    return {v.metric: (v.value, v.passed) for v in check_gates(metrics, gates)}


def test_gates_read_accuracy_as_a_floor_and_perplexity_as_a_ceiling():
    metrics = {"accuracy": 0.9, "f1_macro": 0.85, "perplexity": 30.0, "eval_loss": 3.4}
    assert verdicts(metrics, {"accuracy": 0.85, "f1_macro": 0.9, "perplexity": 40, "eval_loss": 3.0}) == {
        "accuracy": (0.9, True),
        "f1_macro": (0.85, False),
        "perplexity": (30.0, True),
        "eval_loss": (3.4, False),
    }
    at_threshold = {"accuracy": 0.9, "perplexity": 30}
    assert verdicts(metrics, at_threshold) == {"accuracy": (0.9, True), "perplexity": (30.0, True)}
    [verdict] = check_gates({"accuracy": 0.9}, {"perplexity": 40})
    assert (verdict.value, verdict.passed, verdict.higher_is_better, verdict.threshold) == (None, False, False, 40)
    [nan_verdict] = check_gates({"accuracy": float("nan")}, {"accuracy": 0.0})
    assert not nan_verdict.passed


def test_metrics_for_task_names_what_each_task_reports():
    assert metrics_for_task(CLASSIFICATION) == {"accuracy", "f1_macro", "precision", "recall"}
    assert metrics_for_task("causal-lm") == {"eval_loss", "perplexity"}


def test_classification_report_macro_averages_and_an_unpredicted_class():
    # rows are true labels, columns predictions; class "c" is never predicted
    report = classification_report([[2, 1, 0], [0, 3, 0], [1, 1, 0]], ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(5 / 8)
    assert report["precision"] == pytest.approx((2 / 3 + 3 / 5 + 0) / 3)
    assert report["recall"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    f1_b = 2 * (3 / 5) * 1 / (3 / 5 + 1)
    assert report["f1_macro"] == pytest.approx((2 / 3 + f1_b + 0) / 3)
    assert (report["num_examples"], report["labels"]) == (8, ["a", "b", "c"])


def test_classification_baseline_is_deterministic_and_samples_score_every_label(tmp_path):
    model_path = str(bundled_minilm_dir())
    examples = tiny.easy_classification_examples(9)
    rows = tiny.classification_rows(AutoTokenizer.from_pretrained(model_path), examples)
    shard = tiny.write_shard(tmp_path / "test.parquet", rows)
    first = evaluate_model(model_path, CLASSIFICATION, EASY_LABELS, [shard], adapter_dir=None)
    second = evaluate_model(model_path, CLASSIFICATION, EASY_LABELS, [shard], adapter_dir=None, eval_batch_size=4)
    assert first == second and first["num_examples"] == 9
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in examples[:3]))

    rows = run_sample_prompts(
        model_path, CLASSIFICATION, EASY_LABELS, None, str(prompts), str(tmp_path / "out.jsonl"), 32, 8
    )

    assert rows == read_jsonl(tmp_path / "out.jsonl")
    assert [(row["text"], row["label"]) for row in rows] == [(e["text"], e["label"]) for e in examples[:3]]
    for row in rows:
        assert row["predicted"] in EASY_LABELS and list(row["scores"]) == EASY_LABELS
        assert sum(row["scores"].values()) == pytest.approx(1.0)
        assert row["scores"][row["predicted"]] == max(row["scores"].values())


def test_causal_lm_adapter_lowers_loss_and_generates(tmp_path):
    corpus = tiny.tiny_corpus()
    model_path = tiny.build_tiny_llama(tmp_path / "base", corpus)
    rows = tiny.causal_lm_rows(AutoTokenizer.from_pretrained(model_path), corpus)
    train = tiny.write_shard(tmp_path / "train.parquet", rows[:32])
    test = tiny.write_shard(tmp_path / "test.parquet", rows[32:])
    settings = TrainingSettings(
        learning_rate=2e-2, num_epochs=3, batch_size=4, max_length=64, save_steps=100, logging_steps=8,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0, target_modules="all-linear"),
    )
    request = TrainRequest(
        model_path=model_path, task="causal-lm", settings=settings, labels=None, train_shards=[train], eval_shards=[],
        checkpoint_dir=str(tmp_path / "ckpt"), adapter_dir=str(tmp_path / "model"), logs_dir=str(tmp_path / "logs"),
    )
    adapter_dir = train_adapter(request, log=lambda message: None).adapter_dir

    baseline = evaluate_model(model_path, "causal-lm", None, [test], adapter_dir=None)
    tuned = evaluate_model(model_path, "causal-lm", None, [test], adapter_dir=adapter_dir, eval_batch_size=3)

    assert tuned["num_examples"] == baseline["num_examples"] == 16
    assert tuned["eval_loss"] < baseline["eval_loss"] - 0.3, (baseline, tuned)
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["eval_loss"]))

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the red cat", "reference": "sat on the mat."}) + "\n")
    out = tmp_path / "samples.jsonl"
    [sample] = run_sample_prompts(model_path, "causal-lm", None, adapter_dir, str(prompts), str(out), 64, 6)
    assert (sample["prompt"], sample["reference"]) == ("the red cat", "sat on the mat.")
    assert isinstance(sample["generated"], str) and sample["generated"].strip()
    assert read_jsonl(out) == [sample]
