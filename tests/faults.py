"""Trainer callbacks that inject faults into a training child process (`LaunchOptions.callbacks`
names them as `tests.faults:Class`; each rank builds its own)."""

from __future__ import annotations

import torch
from transformers import TrainerCallback


class OutOfMemoryAboveBatchTwo(TrainerCallback):
    """CUDA's out-of-memory error from step 2 on, while the per-device batch exceeds 2."""

    def on_step_begin(self, args, state, control, **kwargs):
        if args.per_device_train_batch_size > 2 and state.global_step >= 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class OutOfMemoryAlways(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
