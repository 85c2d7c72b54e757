"""Out of memory in training: retried from the last checkpoint with half the per-device batch and
twice the accumulation (same effective batch), down to 1, then a clear error. The CUDA error is
injected through a Trainer callback, so the mechanism runs on a CPU-only machine."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from loraflow.errors import TrainingOutOfMemory
from loraflow.settings import LoraSettings
from loraflow.train.trainer import config_fingerprint, train_adapter
from tasks.policies import is_transient
from tests.test_train import adapter_weights, request_for, tiny_llama  # noqa: F401  (tiny_llama is a fixture)

NO_DROPOUT = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules="auto")


class OutOfMemoryAbove(TrainerCallback):
    """Raise CUDA's out-of-memory error from step `from_step` on while the per-device batch exceeds `fits`."""

    def __init__(self, fits: int, from_step: int = 0):
        self.fits, self.from_step, self.batch_sizes = fits, from_step, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.batch_sizes.append(args.per_device_train_batch_size)
        if args.per_device_train_batch_size > self.fits and state.global_step >= self.from_step:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_halves_the_batch_resumes_and_matches_the_full_batch_run(tmp_path, tiny_llama):
    model_path, train = tiny_llama
    request = request_for(tmp_path / "oom", model_path, "causal-lm", [train], lora=NO_DROPOUT)
    oom = OutOfMemoryAbove(fits=2, from_step=3)  # after checkpoint-2 exists
    messages: list[str] = []

    result = train_adapter(request, log=messages.append, callbacks=(oom,))

    assert (result.batch_size, result.gradient_accumulation_steps) == (2, 2)
    assert result.resumed_from_step == 2 and result.global_step == 18
    assert (
        "warning: out of memory at batch_size 4; retrying from the last checkpoint with batch_size 2, "
        "gradient_accumulation_steps 2 (effective batch 4)" in messages
    )
    assert "resuming from checkpoint-2 (step 2 of 18)" in messages
    assert set(oom.batch_sizes) == {4, 2}

    full = train_adapter(request_for(tmp_path / "full", model_path, "causal-lm", [train], lora=NO_DROPOUT),
                         log=lambda m: None)
    expected, actual = adapter_weights(full.adapter_dir), adapter_weights(result.adapter_dir)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)


def test_out_of_memory_at_batch_one_fails_with_a_clear_transient_error(tmp_path, tiny_llama):
    model_path, train = tiny_llama
    request = request_for(tmp_path, model_path, "causal-lm", [train], batch_size=6, num_epochs=1)
    messages: list[str] = []

    with pytest.raises(TrainingOutOfMemory) as raised:
        train_adapter(request, log=messages.append, callbacks=(OutOfMemoryAbove(fits=0),))

    assert str(raised.value).startswith(
        "training ran out of memory even at batch_size 1 (gradient_accumulation_steps 6): CUDA out of memory."
    )
    assert "lower overrides.max_length" in str(raised.value)
    ladder = [m for m in messages if m.startswith("warning: out of memory")]
    assert [m.split(";")[1].split("(")[0].strip() for m in ladder] == [
        "retrying from the last checkpoint with batch_size 3, gradient_accumulation_steps 2",
        "retrying from the last checkpoint with batch_size 1, gradient_accumulation_steps 6",
    ]
    assert is_transient(raised.value), "another job may free the memory: Prefect retries it with backoff"
    assert not (tmp_path / "model").exists()


def test_checkpoints_resume_across_any_split_of_the_same_effective_batch(tmp_path, tiny_llama):
    model_path, train = tiny_llama
    base = request_for(tmp_path, model_path, "causal-lm", [train], batch_size=4, gradient_accumulation_steps=1)
    split = request_for(tmp_path, model_path, "causal-lm", [train], batch_size=2, gradient_accumulation_steps=2)
    bigger = request_for(tmp_path, model_path, "causal-lm", [train], batch_size=4, gradient_accumulation_steps=2)
    assert config_fingerprint(base) == config_fingerprint(split) != config_fingerprint(bigger)
