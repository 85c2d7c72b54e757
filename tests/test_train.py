"""LoRA training on real models: MiniLM classification, and checkpoint resume on a tiny Llama."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from loraflow.evaluate import evaluate_model
from loraflow.models import bundled_minilm_dir
from loraflow.settings import LoraSettings, TrainingSettings
from loraflow.train.checkpoints import (
    COMPLETE_MARKER,
    FINGERPRINT_FILE,
    find_resumable_checkpoint,
    mark_checkpoint_complete,
)
from loraflow.train.device import pick_device
from loraflow.train.request import ProgressUpdate, TrainRequest
from loraflow.train.trainer import train_adapter
from tests.tiny_models import (
    EASY_LABELS,
    build_tiny_llama,
    causal_lm_rows,
    classification_rows,
    easy_classification_examples,
    tiny_corpus,
    write_shard,
)

CLASSIFICATION = "sequence-classification"


def request_for(root: Path, model_path: str, task: str, train: list[str], **changes) -> TrainRequest:
    """A request whose outputs all live under `root`; `changes` override training settings."""
    settings = {
        "learning_rate": 5e-3,
        "num_epochs": 3,
        "batch_size": 4,
        "max_length": 64,
        "save_steps": 2,
        "logging_steps": 1,
        "save_total_limit": 10,
        "lora": LoraSettings(r=8, alpha=16, dropout=0.05, target_modules="auto"),
    }
    return TrainRequest(
        model_path=model_path,
        task=task,
        settings=TrainingSettings(**{**settings, **changes}),
        labels=EASY_LABELS if task == CLASSIFICATION else None,
        train_shards=train,
        eval_shards=[],
        checkpoint_dir=str(root / "checkpoints"),
        adapter_dir=str(root / "model"),
        logs_dir=str(root / "logs"),
    )


def test_pick_device_on_this_cpu_machine():
    plan = pick_device()
    assert (plan.device, plan.bf16, plan.fp16, plan.dtype_name) == ("cpu", False, False, "float32")


def test_minilm_classification_adapter_beats_baseline(tmp_path):
    model_path = str(bundled_minilm_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, validation, test = (
        write_shard(tmp_path / f"{name}.parquet", classification_rows(tokenizer, easy_classification_examples(n, seed)))
        for name, n, seed in (("train", 60, 0), ("val", 12, 1), ("test", 30, 2))
    )
    request = request_for(
        tmp_path, model_path, CLASSIFICATION, [train], num_epochs=4, batch_size=8, logging_steps=5, save_steps=16,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["query", "value"]),
    ).model_copy(update={"eval_shards": [validation]})
    updates: list[ProgressUpdate] = []
    messages: list[str] = []

    result = train_adapter(request, on_progress=updates.append, log=messages.append)

    assert (result.global_step, result.epochs, result.resumed_from_step) == (32, 4.0, None)
    assert result.train_loss is not None and result.samples_per_second and result.tokens_per_second
    assert (result.device, result.precision) == ("cpu", "fp32")
    model_dir = Path(result.adapter_dir)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "label_map.json"):
        assert (model_dir / name).is_file(), name
    assert json.loads((model_dir / "label_map.json").read_text()) == {
        "id2label": {"0": "sports", "1": "food", "2": "weather"},
        "label2id": {"sports": 0, "food": 1, "weather": 2},
    }
    assert "classifier" in json.loads((model_dir / "adapter_config.json").read_text())["modules_to_save"]
    assert not list(tmp_path.glob(".model.*")), "the staging folder was not swapped in"

    steps = [update.step for update in updates]
    assert steps[0] == 1 and steps[-1] == 32 and steps == sorted(steps)
    assert all(update.max_steps == 32 for update in updates)
    assert any(re.fullmatch(r"step 5/32 epoch 0\.62 loss \d\.\d{4} lr \S+ eta \d+s", m) for m in messages), messages
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "step", "epoch", "timestamp"} <= records[0].keys()
    assert any("eval_loss" in record for record in records), "validation ran at each save"

    baseline = evaluate_model(model_path, CLASSIFICATION, EASY_LABELS, [test], adapter_dir=None)
    tuned = evaluate_model(model_path, CLASSIFICATION, EASY_LABELS, [test], adapter_dir=result.adapter_dir)
    assert tuned["num_examples"] == 30
    assert tuned["accuracy"] >= 0.8 and tuned["accuracy"] > baseline["accuracy"] + 0.3, (baseline, tuned)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[str, str]:
    """A tiny Llama and a 24-row training shard (6 steps per epoch at batch size 4)."""
    root = tmp_path_factory.mktemp("tiny-llama")
    corpus = tiny_corpus()
    model_path = build_tiny_llama(root / "model", corpus)
    rows = causal_lm_rows(AutoTokenizer.from_pretrained(model_path), corpus[:24])
    return model_path, write_shard(root / "train.parquet", rows)


class Crash(RuntimeError):
    pass


def crash_at(step: int):
    def on_progress(update: ProgressUpdate) -> None:
        if update.step >= step:
            raise Crash(f"simulated crash at step {update.step}")

    return on_progress


def adapter_weights(adapter_dir: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def test_resume_skips_broken_checkpoints_and_matches_an_uninterrupted_run(tmp_path, tiny_llama):
    model_path, train = tiny_llama
    request = request_for(tmp_path / "run", model_path, "causal-lm", [train])
    with pytest.raises(Crash):
        train_adapter(request, on_progress=crash_at(7), log=lambda message: None)
    checkpoints = Path(request.checkpoint_dir)
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not Path(request.adapter_dir).exists()
    (checkpoints / "checkpoint-6" / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    (checkpoints / "checkpoint-4" / "adapter_model.safetensors").unlink()
    messages: list[str] = []
    updates: list[ProgressUpdate] = []

    resumed = train_adapter(request, on_progress=updates.append, log=messages.append)

    assert resumed.resumed_from_step == 2 and resumed.global_step == 18
    assert "warning: skipping checkpoint-6: trainer_state.json is unreadable" in "\n".join(messages)
    assert "warning: skipping checkpoint-4: adapter weights are missing" in messages
    assert "resuming from checkpoint-2 (step 2 of 18)" in messages
    assert updates[0].step == 3, "the resumed run continues after the checkpoint"
    assert Path(resumed.adapter_dir, "adapter_model.safetensors").is_file()

    uninterrupted = train_adapter(request_for(tmp_path / "clean", model_path, "causal-lm", [train]), log=lambda m: None)
    expected, actual = adapter_weights(uninterrupted.adapter_dir), adapter_weights(resumed.adapter_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


def test_rerun_of_a_finished_run_resumes_at_its_end_and_a_new_config_starts_over(tmp_path, tiny_llama):
    model_path, train = tiny_llama
    request = request_for(tmp_path, model_path, "causal-lm", [train], num_epochs=1, save_steps=3)
    train_adapter(request, log=lambda message: None)
    messages: list[str] = []

    again = train_adapter(request, log=messages.append)

    assert again.resumed_from_step == 6 and again.global_step == 6 and again.train_loss is None
    assert "resuming from checkpoint-6 (step 6 of 6)" in messages

    changed = request.model_copy(update={"settings": request.settings.model_copy(update={"learning_rate": 1e-3})})
    messages.clear()
    fresh = train_adapter(changed, log=messages.append)

    assert fresh.resumed_from_step is None and fresh.train_loss is not None
    assert any("a different configuration wrote them" in message for message in messages)
    assert (Path(request.checkpoint_dir) / FINGERPRINT_FILE).is_file()


def test_find_resumable_checkpoint_wants_state_weights_optimizer_and_scheduler(tmp_path):
    def checkpoint(step: int, without: str = "", weights: bytes | None = None) -> None:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        save_file({"lora_A": torch.zeros(2, 2)}, folder / "adapter_model.safetensors")
        if weights is not None:
            (folder / "adapter_model.safetensors").write_bytes(weights)
        for name in ("optimizer.pt", "scheduler.pt"):
            (folder / name).write_bytes(b"state")
        mark_checkpoint_complete(folder)
        if without:
            (folder / without).unlink()

    checkpoint(5)
    checkpoint(10)
    checkpoint(15, weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # header promises more than is there
    checkpoint(20, without="trainer_state.json")
    checkpoint(30, without="optimizer.pt")
    checkpoint(40, without=COMPLETE_MARKER)  # killed before the Trainer finished writing it
    (tmp_path / "checkpoint-x").mkdir()
    messages: list[str] = []

    assert find_resumable_checkpoint(tmp_path, messages.append) == str(tmp_path / "checkpoint-10")
    assert messages[:3] == [
        "warning: skipping checkpoint-40: it was never marked complete (interrupted while saving)",
        "warning: skipping checkpoint-30: optimizer.pt missing",
        "warning: skipping checkpoint-20: trainer_state.json is missing",
    ]
    assert messages[3].startswith("warning: skipping checkpoint-15: adapter weights are unreadable")
    assert find_resumable_checkpoint(tmp_path / "absent", messages.append) is None
