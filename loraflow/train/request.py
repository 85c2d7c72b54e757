"""What a training run is asked to do and what it reports: plain data, no torch.

Kept apart from the trainer so that the flows, a plan or a fully cached run can pass these
around without importing torch, transformers and peft (seconds on a small machine).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, Field

from loraflow.errors import TrainingOutOfMemory
from loraflow.settings import TrainingSettings
from loraflow.tracking import TrackingRequest


class TrainRequest(BaseModel):
    model_path: str
    task: str
    settings: TrainingSettings
    labels: list[str] | None
    train_shards: list[str]
    eval_shards: list[str]
    checkpoint_dir: str
    adapter_dir: str
    logs_dir: str
    seed: int = 42
    processes: int = Field(default=1, ge=1, description="Training processes in all (devices x nodes), one per device.")
    tracking: TrackingRequest | None = Field(default=None, description="Trackers the Trainer reports step metrics to.")
    quantization: str | None = Field(default=None, description="QLoRA: `4bit` or `8bit` base (bitsandbytes, CUDA).")
    packing: bool = Field(default=False, description="Pack the training rows, padding-free (loraflow.train.packing).")
    chat_template: str | None = Field(
        default=None, description="Chat: the template the data was rendered with, saved with the adapter's tokenizer."
    )

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimiser step: what shapes the training, however it is split."""
        return self.settings.batch_size * self.settings.gradient_accumulation_steps * self.processes


def smaller_batch(settings: TrainingSettings, error: BaseException, log: Callable[[str], None]) -> TrainingSettings:
    """Half the per-device batch (or its largest divisor below half) and as much more accumulation:
    the effective batch stays, so the checkpoints stay valid. At batch size 1, `TrainingOutOfMemory`."""
    size, accumulation = settings.batch_size, settings.gradient_accumulation_steps
    if size == 1:
        raise TrainingOutOfMemory(
            f"training ran out of memory even at batch_size 1 (gradient_accumulation_steps {accumulation}): "
            f"{str(error).splitlines()[0] if str(error) else 'CUDA out of memory'}; lower overrides.max_length, "
            "use a smaller model, or free the GPU"
        ) from None
    smaller = next(d for d in range(size // 2, 0, -1) if size % d == 0)
    more = accumulation * size // smaller
    log(
        f"warning: out of memory at batch_size {size}; retrying from the last checkpoint with batch_size {smaller}, "
        f"gradient_accumulation_steps {more} (effective batch {smaller * more})"
    )
    return settings.model_copy(update={"batch_size": smaller, "gradient_accumulation_steps": more})


class ProgressUpdate(BaseModel):
    step: int
    max_steps: int
    epoch: float
    loss: float | None
    learning_rate: float | None
    eta_seconds: float | None


class TrainResult(BaseModel):
    adapter_dir: str
    global_step: int
    epochs: float
    train_loss: float | None
    resumed_from_step: int | None
    samples_per_second: float | None
    tokens_per_second: float | None
    train_runtime_s: float
    device: str
    precision: str
    batch_size: int
    gradient_accumulation_steps: int
    peak_memory_mb: float | None = None  # the device's peak allocation (CUDA), else the process's peak RSS
    # Filled in by the launcher (loraflow.train.launch): where and when the training ran.
    devices: list[str] = Field(default_factory=list, description="Devices used: `cuda:0`, `cpu:1`, ...")
    processes: int = 1
    nnodes: int = 1
    started_at: str | None = None
    finished_at: str | None = None
