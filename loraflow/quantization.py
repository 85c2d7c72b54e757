"""`quantization: 4bit | 8bit` (QLoRA): the frozen base is loaded quantized by bitsandbytes, on CUDA only.

Evaluation, samples and `export: merged` load the base unquantized (as a server would, the usual way
to run a QLoRA adapter), so their numbers are of the adapter on the full-precision base.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from loraflow.devices import host_devices
from loraflow.errors import ConfigError


def check_quantization(quantization: str | None, dispatched: bool) -> None:
    """Refuse, in the parameter check, quantised training this host cannot run: no bitsandbytes, or
    (when training runs here rather than on a GPU work pool) no CUDA device."""
    if quantization is None:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"quantization: {quantization} needs bitsandbytes: pip install 'loraflow[qlora]'")
    if not dispatched and host_devices().kind != "cuda":
        raise ConfigError(f"quantization: {quantization} needs a CUDA GPU (bitsandbytes) and this host has none; "
                          "unset quantization or train on a GPU work pool (training_dispatch: deployment)")


def quantized_loading(quantization: str | None, dtype: Any) -> dict[str, Any]:
    """`from_pretrained` arguments that load the base quantized on this process's own GPU (none unquantized)."""
    if quantization is None:
        return {}
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":  # QLoRA's recipe: NF4, double quantisation, compute in the training dtype
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}
