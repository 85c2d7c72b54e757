"""Training settings and the presets that hold them, and the folder-safe names runs are filed under.

A *preset* is a YAML file in `loraflow/presets/` with the `TrainingSettings` of one task type and
model size; `resolve_training_settings` deep-merges a run's `overrides` over it, naming any
unknown key and suggesting the closest valid one. Nothing here imports the rest of the core but
its errors and the task table, so the parameter models (`loraflow.config`) and the grid expansion
(`loraflow.grid`) both build on it.
"""

from __future__ import annotations

import copy
import difflib
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from loraflow.errors import ConfigError
from loraflow.task_table import TASK_TABLE

TASKS: tuple[str, ...] = tuple(TASK_TABLE)
Task = Literal[TASKS]  # type: ignore[valid-type]
DEFAULT_PRESET: dict[str, str] = {name: task.default_preset for name, task in TASK_TABLE.items()}
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_safe_name(name: str, what: str = "name") -> str:
    """Names become folder names under the output root: no separators, no `..`, no escape."""
    if ".." in name or not _SAFE_NAME.match(name):
        raise ValueError(
            f"{what} {name!r} is not a safe folder name: use letters, digits, '.', '_' and '-' "
            "(no '/', no '..', not starting with '.' or '-')"
        )
    return name


def safe_folder(what: str) -> AfterValidator:
    """A field validator for names that become folders: `Annotated[str, safe_folder("dataset.name")]`."""
    return AfterValidator(lambda name: check_safe_name(name, what))


def name_from_path(path: str) -> str:
    """A dataset's default name: its file stem or folder name, made folder-safe."""
    stem = Path(path.rstrip("/\\")).name
    stem = stem.split(".")[0] if "." in stem and not stem.startswith(".") else stem
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip(".-_") or "dataset"
    return cleaned[:128]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSettings(StrictModel):
    r: int = Field(gt=0, description="LoRA rank.")
    alpha: float = Field(gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] | Literal["all-linear", "auto"] = Field(
        description="Module names to adapt, `all-linear`, or `auto` (peft's default for the architecture)."
    )


class TrainingSettings(StrictModel):
    """Everything a preset sets. Overrides may change any of these and nothing else."""

    learning_rate: float = Field(gt=0)
    num_epochs: float = Field(gt=0)
    batch_size: int = Field(ge=1, description="Per-device batch size.")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_length: int = Field(ge=8, description="Tokens per example after truncation.")
    save_steps: int = Field(ge=1, description="Checkpoint every this many optimiser steps.")
    eval_batch_size: int = Field(default=64, ge=1)
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    logging_steps: int = Field(default=10, ge=1)
    save_total_limit: int = Field(default=2, ge=1)
    max_new_tokens: int = Field(default=32, ge=1, description="Tokens generated per sample prompt (causal-LM).")
    lora: LoraSettings


def suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(sorted(choices))})"


def available_presets() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """A preset is a YAML mapping of `TrainingSettings` fields plus `task` and `description`; each
    file is read once per process (settings are resolved from parameters wherever they are needed),
    and every caller gets its own copy to change."""
    return copy.deepcopy(_read_preset(name))


@lru_cache(maxsize=None)
def _read_preset(name: str) -> dict[str, Any]:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset: unknown preset {name!r}{suggest(name, available_presets())}")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def expand_dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """`{"lora.r": 4}` -> `{"lora": {"r": 4}}`, merging with nested keys given alongside."""
    expanded: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = str(key).partition(".")
        value = expand_dotted(value) if isinstance(value, dict) else value
        if rest:
            value = expand_dotted({rest: value})
        if isinstance(value, dict) and isinstance(expanded.get(head), dict):
            expanded[head] = deep_merge(expanded[head], value)
        else:
            expanded[head] = value
    return expanded


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_known_keys(values: dict[str, Any], model: type[BaseModel], prefix: str = "") -> None:
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        field = model.model_fields.get(key)
        if field is None:
            valid = [f"{prefix}{name}" for name in model.model_fields]
            raise ConfigError(f"overrides: unknown key {dotted!r}{suggest(dotted, valid)}")
        nested = field.annotation
        if isinstance(value, dict) and isinstance(nested, type) and issubclass(nested, BaseModel):
            _check_known_keys(value, nested, f"{dotted}.")


def resolve_training_settings(preset: str, overrides: dict[str, Any], task: str) -> TrainingSettings:
    """Preset + overrides -> validated settings, or a `ConfigError` naming the bad key."""
    preset_values = load_preset(preset)
    preset_task = preset_values.pop("task", task)
    preset_values.pop("description", None)
    if preset_task != task:
        raise ConfigError(f"preset: {preset!r} is for task {preset_task!r}, but task is {task!r}")
    expanded = expand_dotted(overrides)
    _check_known_keys(expanded, TrainingSettings)
    try:
        return TrainingSettings.model_validate(deep_merge(preset_values, expanded))
    except ValidationError as error:
        problems = [f"overrides.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
        raise ConfigError("; ".join(problems)) from None
