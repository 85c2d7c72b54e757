"""The grid of a variations run, expanded into named variants: plain settings, no models.

`expand_variations` turns `grid` (dotted preset key -> values; every combination) and
`zip` groups (keys whose value lists move together) into named variants, and checks all
of it before anything runs: the count against `max_variations`, every variant's settings,
and every name (unique, folder-safe, not the shared `data` folder, inside the output root).

Names come from `name_template`: `{dataset}`, `{preset}`, `{variation}` (the varied values,
compact: `learning_rate0.001-r4`), `{index}` (1-based) and each varied key with its dots as
underscores (`{learning_rate}`, `{lora_r}`; format specs work: `{learning_rate:.0e}`).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from loraflow.errors import ConfigError
from loraflow.metrics import DEFAULT_RANK_METRIC, metrics_for_task
from loraflow.settings import check_safe_name, expand_dotted, resolve_training_settings

if TYPE_CHECKING:  # the parameter models validate a grid by expanding it here
    from loraflow.config import VariationsParams

RUN_SETTING_KEYS = ("devices",)  # grid keys that are run parameters rather than preset keys
SHARED_DATA_FOLDER = "data"  # the prepared dataset every variant trains on, beside the variant folders
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class Variant(BaseModel):
    """One grid point: its name, the values it varies, and the overrides it trains with."""

    index: int
    name: str
    values: dict[str, Any]
    overrides: dict[str, Any]
    run_settings: dict[str, Any] = {}  # RUN_SETTING_KEYS this variant sets


def rank_metric(params: VariationsParams) -> str:
    """The metric variants are ranked by; it must be one the task's evaluation reports."""
    metric = params.metric or DEFAULT_RANK_METRIC[params.task]
    if metric not in metrics_for_task(params.task):
        raise ConfigError(
            f"metric: {metric!r} is not reported for task {params.task!r}; use one of "
            f"{sorted(metrics_for_task(params.task))}"
        )
    return metric


def _axes(grid: dict[str, list[Any]], groups: list[dict[str, list[Any]]]) -> list[list[dict[str, Any]]]:
    """One axis per grid key and per zip group; each axis lists the assignments it contributes."""
    where: dict[str, str] = {}
    axes: list[list[dict[str, Any]]] = []
    for origin, group in [("grid", grid), *((f"zip.{i}", group) for i, group in enumerate(groups))]:
        for key, values in group.items():
            if key in where:
                raise ConfigError(f"{origin}: {key!r} is already varied by {where[key]}; vary each key in one place")
            if not values:
                raise ConfigError(f"{origin}.{key}: give at least one value")
            where[key] = origin
        if origin == "grid":
            axes += [[{key: value} for value in values] for key, values in group.items()]
        elif group:
            lengths = {key: len(values) for key, values in group.items()}
            if len(set(lengths.values())) > 1:
                raise ConfigError(f"{origin}: lists that vary together need the same length (got {lengths})")
            axes.append([dict(zip(group, combination)) for combination in zip(*group.values())])
    return axes


def _text(value: Any) -> str:
    text = ".".join(map(str, value)) if isinstance(value, list) else str(value)
    return _UNSAFE.sub("-", text)


def variation_label(values: dict[str, Any]) -> str:
    """`{"learning_rate": 0.001, "lora.r": 4}` -> `learning_rate0.001-r4`; `base` when nothing varies."""
    return "-".join(f"{key.rsplit('.', 1)[-1]}{_text(value)}" for key, value in values.items()) or "base"


def render_name(template: str, fields: dict[str, Any], index: int) -> str:
    try:
        name = template.format_map(fields)
    except KeyError as error:
        raise ConfigError(
            f"name_template: unknown placeholder {{{error.args[0]}}}; use {', '.join(f'{{{k}}}' for k in fields)}"
        ) from None
    except (ValueError, IndexError) as error:
        raise ConfigError(f"name_template: {template!r} is not a valid template ({error})") from None
    try:
        return check_safe_name(name, f"name_template: variant {index}'s name")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def expand_variations(params: VariationsParams) -> list[Variant]:
    """Every variant, named and with settings that resolve, or a `ConfigError` naming the problem."""
    rank_metric(params)
    axes = _axes(params.grid, params.zip)
    count = math.prod(len(axis) for axis in axes)
    if count > params.max_variations:
        raise ConfigError(
            f"grid: {count} variants exceed max_variations={params.max_variations}; "
            "shrink the grid or raise max_variations"
        )
    variants: list[Variant] = []
    for index, assignments in enumerate(itertools.product(*axes), start=1):
        values = {key: value for assignment in assignments for key, value in assignment.items()}
        run_settings = {key: value for key, value in values.items() if key in RUN_SETTING_KEYS}
        overrides = {**params.overrides, **{key: value for key, value in values.items() if key not in run_settings}}
        for key, value in run_settings.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"grid: variant {index} ({variation_label(values)}): {key}: {value!r} is not a whole "
                                  "number of devices (1 or more)")
        try:
            resolve_training_settings(params.preset_name, overrides, params.task)
        except ConfigError as error:
            raise ConfigError(f"grid: variant {index} ({variation_label(values)}): {error}") from None
        fields = {
            "dataset": params.dataset.resolved_name,
            "preset": params.preset_name,
            "variation": variation_label(values),
            "index": index,
            **{key.replace(".", "_"): value for key, value in values.items()},
        }
        name = render_name(params.name_template, fields, index)
        variants.append(Variant(index=index, name=name, values=values, overrides=expand_dotted(overrides),
                                run_settings=run_settings))
    _check_distinct(variants, params.name_template)
    return variants


def _check_distinct(variants: list[Variant], template: str) -> None:
    first: dict[str, int] = {}
    for variant in variants:
        if variant.name == SHARED_DATA_FOLDER:
            raise ConfigError(f"name_template: {variant.name!r} is the shared data folder; choose another template")
        if variant.name in first:
            raise ConfigError(
                f"name_template: {template!r} names variants {first[variant.name]} and {variant.index} both "
                f"{variant.name!r}; include {{variation}}, {{index}} or the varied keys"
            )
        first[variant.name] = variant.index
