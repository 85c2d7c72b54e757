"""What a training run is asked to do and what it reports: plain data, no torch.

Kept apart from the trainer so that the flows, a plan or a fully cached run can pass these
around without importing torch, transformers and peft (seconds on a small machine).
"""

from __future__ import annotations

from pydantic import BaseModel

from loraflow.config import TrainingSettings


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
