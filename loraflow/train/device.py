"""Where training and evaluation run, and in which precision."""

from __future__ import annotations

import torch
from pydantic import BaseModel


class DeviceChoice(BaseModel):
    """The device and mixed-precision flags the Trainer and evaluation agree on."""

    device: str
    bf16: bool
    fp16: bool
    dtype_name: str


def pick_device() -> DeviceChoice:
    """CUDA in bf16 where the GPU supports it (fp16 otherwise), then MPS, then CPU; fp32 off CUDA."""
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return DeviceChoice(device="cuda", bf16=bf16, fp16=not bf16, dtype_name="bfloat16" if bf16 else "float16")
    if torch.backends.mps.is_available():
        return DeviceChoice(device="mps", bf16=False, fp16=False, dtype_name="float32")
    return DeviceChoice(device="cpu", bf16=False, fp16=False, dtype_name="float32")
