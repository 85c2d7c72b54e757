"""One validated parameter set per flow.

`SingleParams` is the whole parameter set of the `single` flow. The same model is the
Prefect deployment's parameter schema (UI form), the schema of a YAML/JSON parameter
file, and the validation that runs before any work starts. Training settings, presets and
folder-safe names live in `loraflow.settings`; the grid of a variations run in `loraflow.grid`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from loraflow.chat import template_text
from loraflow.errors import ConfigError
from loraflow.gates import Approval, Gate, GateVerdict, load_gate_profile
from loraflow.grid import expand_variations
from loraflow.metrics import HIGHER_IS_BETTER
from loraflow.promotion import PromotionRequest, Rule
from loraflow.settings import (
    DEFAULT_PRESET,
    StrictModel,
    Task,
    deep_merge,
    expand_dotted,
    name_from_path,
    resolve_training_settings,
    safe_folder,
    suggest,
)
from loraflow.task_table import TASK_TABLE


class DatasetSpec(StrictModel):
    """Where the data is and how to read it."""

    path: str = Field(description="A data file, or a directory of data files (read in name order).")
    name: Annotated[str, safe_folder("dataset.name")] | None = Field(
        default=None, description="Folder name for this dataset's outputs; defaults to the file or folder name."
    )
    format: Literal["auto", "jsonl", "csv", "txt", "parquet"] = Field(
        default="auto", description="File format; `auto` picks it from each file's extension."
    )
    text_column: str = Field(default="text", description="Column holding the input text.")
    label_column: str = Field(default="label", description="Column holding the class label (classification).")
    prompt_column: str | None = Field(default=None, description="Instruction column (causal-LM prompt/completion data).")
    completion_column: str | None = Field(default=None, description="Answer column (causal-LM prompt/completion data).")
    repeats: int = Field(default=1, ge=1, le=1000, description="Times each training row is seen per epoch (oversampling).")
    max_rows: int | None = Field(default=None, ge=1, description="Read at most this many rows (after rejects).")
    min_chars: int = Field(default=1, ge=1, description="Rows whose text is shorter than this go to rejects.")
    max_chars: int = Field(default=20000, ge=1, description="Rows whose text is longer than this go to rejects.")
    validation_fraction: float = Field(default=0.1, ge=0.0, lt=0.5, description="Share of rows in the validation split.")
    test_fraction: float = Field(default=0.15, gt=0.0, lt=0.5, description="Share of rows in the test split.")
    max_reject_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Fail when more than this share of rows is rejected."
    )
    truncate_prompt: Literal["left"] | None = Field(
        default=None,
        description="Causal-LM prompt/completion rows longer than max_length: unset cuts the end (a prompt that "
        "fills max_length leaves no completion and the row is rejected); `left` cuts the prompt's start instead.",
    )

    conversation_format: Literal["auto", "openai", "sharegpt", "alpaca"] = Field(
        default="auto",
        description="Chat rows: OpenAI `messages`, ShareGPT `conversations`, or Alpaca `instruction`/`input`/"
        "`output`; `auto` finds it per file from its columns.",
    )
    messages_column: str | None = Field(
        default=None, description="Chat column holding the message list; `messages` (ShareGPT: `conversations`)."
    )
    roles: dict[str, Literal["system", "user", "assistant", "tool"]] = Field(
        default_factory=dict,
        description="Chat role names of the data to OpenAI roles, e.g. {human: user, bot: assistant}.",
    )
    system_prompt: str | None = Field(default=None, description="Chat: system turn for conversations that have none.")

    @model_validator(mode="after")
    def _pair_prompt_and_completion(self) -> "DatasetSpec":
        if (self.prompt_column is None) != (self.completion_column is None):
            raise ValueError("dataset.prompt_column and dataset.completion_column must be given together")
        return self

    @property
    def resolved_name(self) -> str:
        return self.name or name_from_path(self.path)


class RunSettings(StrictModel):
    """Everything about a run but its data: `single`'s parameters besides `dataset`, a batch's
    defaults for each of its datasets, and the fixed part of a variations grid."""

    task: Task = Field(default="sequence-classification")
    model: str = Field(
        default="minilm",
        description="Hub model id, a local `save_pretrained` directory, or `minilm` (the bundled offline MiniLM).",
    )
    preset: str | None = Field(default=None, description="Preset name; defaults by task.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Preset keys to change, nested or dotted (`lora.r: 16`)."
    )
    gates: dict[str, float] = Field(
        default_factory=dict, description="Metric -> threshold, e.g. `accuracy: 0.85`, `perplexity: 40`."
    )
    gates_file: str | None = Field(
        default=None, description="A YAML file of named gate profiles (`profiles: {dev: {accuracy: 0.7}, ...}`)."
    )
    gate_profile: str | None = Field(
        default=None,
        description="The profile of gates_file in force (dev, staging, production...); inline `gates` are added "
        "on top of it as critical gates.",
    )
    promote_if: Rule = Field(
        default="better",
        description="When a passing run takes `production`: `better` than the version there now by at least "
        "min_improvement on the gate metrics and never worse than the base model; `passes` its critical gates; `never`.",
    )
    min_improvement: float = Field(
        default=0.0, ge=0, description="How much `better` must beat the champion by on each gate metric."
    )
    approval: Approval = Field(
        default="none",
        description="`required`: a run the rule would promote waits for a person's answer in the Prefect UI (or "
        "the REST API) before `production` moves; a gate profile can ask for it too (`approval: required`).",
    )
    approval_timeout_s: int = Field(
        default=86400, gt=0, description="How long a run waits for that answer; after it the version stays "
        "registered and not promoted.",
    )
    output_dir: str = Field(default="runs", description="Root folder for everything the run produces.")
    registry_dir: str | None = Field(default=None, description="Adapter registry root; defaults to <output_dir>/registry.")
    seed: int = Field(default=42)
    shard_size: int = Field(
        default=20000, ge=1,
        description="Most rows per tokenisation task (a shard also stops at 4 MiB); a Dask task costs ~0.1 s, "
        "so smaller shards spend more on scheduling than on tokenising.",
    )
    dask_address: str | None = Field(
        default=None, description="Address of an existing Dask scheduler for tokenisation; a local cluster if unset."
    )
    gpu_concurrency_limit: str = Field(
        default="gpu", description="Global concurrency limit a training run holds one slot of per device."
    )
    devices: int = Field(
        default=1, ge=1,
        description="Devices one training uses, one DDP process each (GPUs; on a host without GPUs, CPU slots "
        "of LORAFLOW_CPU_DEVICES). `batch_size` stays per device.",
    )
    nnodes: int = Field(
        default=1, ge=1,
        description="Machines one training spans (torchrun --nnodes); the rendezvous comes from "
        "LORAFLOW_RDZV_ENDPOINT in the training job's environment.",
    )
    training_hang_timeout_s: float = Field(
        default=1800, gt=0,
        description="End a training whose processes report no step for this long (a hung collective, a stuck "
        "load) and fail it with its last checkpoint named; a retry resumes from there.",
    )
    training_dispatch: Literal["auto", "inline", "deployment"] = Field(
        default="auto",
        description="Where training runs: `inline` in this process, `deployment` as a flow run of the training "
        "deployment on the GPU work pool, `auto` = deployment when this run is itself a deployment run.",
    )
    training_job_variables: dict[str, Any] = Field(
        default_factory=dict,
        description="Job variables for a dispatched training run, e.g. {'env': {'CUDA_VISIBLE_DEVICES': '1'}}.",
    )
    plan_only: bool = Field(
        default=False,
        description="Validate everything and return the execution plan (datasets, row counts, variants, "
        "output paths, estimated steps, cached stages) without training.",
    )
    chat_template: str | None = Field(
        default=None,
        description="Chat: the template conversations are rendered with, when not the model's own: `chatml`, a "
        "Jinja string or a .jinja file; saved with the adapter's tokenizer.",
    )
    train_on: Literal["assistant", "last", "all"] = Field(
        default="assistant",
        description="Chat: tokens the loss is on: every assistant turn with its end-of-turn token, the last "
        "assistant turn only, or all tokens.",
    )
    packing: bool = Field(
        default=False,
        description="Causal-LM and chat: pack short training examples into rows of up to max_length tokens, "
        "padding-free, no attention across examples (`batch_size` then counts packed rows).",
    )
    quantization: Literal["4bit", "8bit"] | None = Field(
        default=None,
        description="QLoRA: load the frozen base quantized by bitsandbytes for training (CUDA only; "
        "`pip install 'loraflow[qlora]'`). Evaluation uses the unquantized base.",
    )
    export: Literal["adapter", "merged"] = Field(
        default="adapter",
        description="`merged` also writes <output_dir>/<name>/merged/: the base model with the adapter merged in "
        "(safetensors, tokenizer and chat template), loadable by plain AutoModelForCausalLM (causal-LM and chat).",
    )
    tracking: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers besides loraflow's own files: `tensorboard` (event files in <run>/logs/"
        "tensorboard), `mlflow` (an experiment per dataset or grid, a run per training run). Needs "
        "`pip install -e '.[tracking]'`.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking server or store; MLFLOW_TRACKING_URI when unset, else <output_dir>/mlflow.db.",
    )

    @field_validator("gates")
    @classmethod
    def _known_gate_metrics(cls, gates: dict[str, float]) -> dict[str, float]:
        for metric in gates:
            if metric not in HIGHER_IS_BETTER:
                raise ValueError(f"unknown gate metric {metric!r}{suggest(metric, HIGHER_IS_BETTER)}")
        return gates

    @field_validator("chat_template")
    @classmethod
    def _template_readable(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                template_text(value)
            except ConfigError as error:
                raise ValueError(str(error).removeprefix("chat_template: ")) from None
        return value

    @model_validator(mode="after")
    def _causal_lm_only_settings(self) -> "RunSettings":
        if TASK_TABLE[self.task].head != "causal-lm":
            asked_for = (("export: merged", self.export == "merged"), ("packing: true", self.packing),
                         (f"quantization: {self.quantization}", self.quantization is not None))
            for name, asked in asked_for:
                if asked:
                    raise ValueError(f"{name} needs a causal-LM task (causal-lm, chat), not {self.task!r}")
        return self

    @model_validator(mode="after")
    def _gate_profile_loads(self) -> "RunSettings":
        """A missing gates file, an unknown profile or a bad gate in it fails before any work."""
        if (self.gate_profile is None) != (self.gates_file is None):
            raise ValueError("gate_profile and gates_file must be given together")
        if self.gate_profile is not None:
            try:
                self.gate_set
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return self

    @property
    def gate_set(self) -> dict[str, float | Gate]:
        """The gates in force: the profile's, with the inline `gates` (bare thresholds: critical) on top."""
        profile = load_gate_profile(self.gates_file, self.gate_profile).gates if self.gate_profile else {}
        return {**profile, **self.gates}

    @property
    def approval_in_force(self) -> Approval:
        """`required` when the parameters or the gate profile in force ask for a person's approval."""
        if self.approval == "required" or not self.gate_profile:
            return self.approval
        return load_gate_profile(self.gates_file, self.gate_profile).approval

    @property
    def gate_thresholds(self) -> dict[str, float]:
        """Every gate in force as metric -> threshold: what a registry verdict records."""
        return {metric: getattr(gate, "threshold", gate) for metric, gate in self.gate_set.items()}

    def promotion(self, verdicts: Iterable[GateVerdict], baseline: dict[str, Any]) -> PromotionRequest:
        """This run's side of the promotion decision: the rule and the evidence."""
        return PromotionRequest(rule=self.promote_if, min_improvement=self.min_improvement, approval=self.approval_in_force,
                                verdicts=list(verdicts), baseline=baseline)

    @model_validator(mode="after")
    def _preset_and_overrides_resolve(self) -> "RunSettings":
        """Refuse a bad preset or override when the parameters are created, not minutes later."""
        try:
            resolve_training_settings(self.preset_name, self.overrides, self.task)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return self

    @property
    def preset_name(self) -> str:
        return self.preset or DEFAULT_PRESET[self.task]

    @property
    def registry_root(self) -> str:
        return self.registry_dir or str(Path(self.output_dir) / "registry")


def _dataset_first(schema: dict[str, Any]) -> None:
    """Pydantic lists inherited fields first; the deployment's form should open with the data."""
    properties = schema["properties"]
    schema["properties"] = {"dataset": properties.pop("dataset"), **properties}


class SingleParams(RunSettings):
    """Parameters of the `single` flow: one dataset to one registered adapter."""

    model_config = ConfigDict(json_schema_extra=_dataset_first)

    dataset: DatasetSpec


DatasetOptions = create_model(
    "DatasetOptions",
    __base__=StrictModel,
    __doc__="How to read a batch's datasets: every `dataset` field but `path` and `name`.",
    **{key: (field.annotation, field) for key, field in DatasetSpec.model_fields.items() if key not in ("path", "name")},
)


class BatchDataset(DatasetSpec):
    """One dataset of a batch; its own task, model, preset, overrides and gates are optional."""

    task: Task | None = Field(default=None, description="This dataset's task; the batch's when unset.")
    model: str | None = Field(default=None, description="This dataset's base model; the batch's when unset.")
    preset: str | None = Field(default=None, description="This dataset's preset; the batch's when unset.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Merged over the batch's overrides.")
    gates: dict[str, float] | None = Field(default=None, description="Replace the batch's gates for this dataset.")
    devices: int | None = Field(default=None, ge=1, description="Devices this dataset's training uses; the batch's when unset.")


_OWN_RUN_SETTINGS = ("task", "model", "preset", "overrides", "gates", "devices")


class BatchParams(RunSettings):
    """Parameters of the `batch` flow: many datasets, each through the `single` pipeline."""

    name: Annotated[str, safe_folder("name")] = Field(
        default="batch", description="Folder under output_dir for batch_result.json."
    )
    datasets: list[BatchDataset] = Field(
        default_factory=list, description="The datasets: `dataset` specs, each optionally with its own settings."
    )
    datasets_dir: str | None = Field(
        default=None, description="Or a folder whose data files and subfolders are the datasets (one each)."
    )
    dataset_options: DatasetOptions = Field(  # type: ignore[valid-type]
        default_factory=DatasetOptions,
        description="How to read every dataset (columns, format, splits); a dataset's own fields win.",
    )
    strategy: Literal["sequential", "parallel"] = Field(
        default="parallel",
        description="`parallel`: up to max_parallel datasets at once (training still queues on the GPU slots).",
    )
    max_parallel: int = Field(default=2, ge=1, description="Datasets in flight at once with `parallel`.")
    continue_on_error: bool = Field(
        default=True,
        description="Finish every other dataset when one fails (the batch still ends Failed); else stop at the first.",
    )

    @model_validator(mode="after")
    def _datasets_resolve(self) -> "BatchParams":
        """Every dataset's settings resolve and no two datasets share a name, before anything runs."""
        if bool(self.datasets) == bool(self.datasets_dir):
            raise ValueError("give either `datasets` (a list of dataset specs) or `datasets_dir` (a folder), not both")
        names = []
        for index, entry in enumerate(self.datasets):
            try:
                names.append((f"datasets.{index}", self.single_params(entry).dataset.resolved_name))
            except ValidationError as error:
                raise ValueError(format_validation_error(error, f"datasets.{index}", SingleParams)) from None
        check_dataset_names(names, self.name)
        return self

    @property
    def parallelism(self) -> int:
        return self.max_parallel if self.strategy == "parallel" else 1

    def single_params(self, dataset: DatasetSpec) -> SingleParams:
        """One dataset's `single` parameters: the batch's settings with the dataset's own on top."""
        own = dataset.model_dump(exclude_unset=True, exclude_none=True)
        settings = self.model_dump(include=set(RunSettings.model_fields))
        settings.update({key: own.pop(key) for key in _OWN_RUN_SETTINGS if key in own})
        settings["overrides"] = deep_merge(expand_dotted(self.overrides), expand_dotted(settings["overrides"]))
        spec = {**self.dataset_options.model_dump(exclude_unset=True), **own}
        return SingleParams(**settings, dataset=spec)


def check_dataset_names(names: list[tuple[str, str]], batch_name: str) -> None:
    """Datasets become folders side by side: `(where, name)` pairs must not collide with each other
    or with the batch's own folder."""
    seen: dict[str, str] = {}
    for where, name in names:
        if name == batch_name:
            raise ValueError(f"{where}: dataset name {name!r} is the batch's own folder name; rename one of them")
        if name in seen:
            raise ValueError(
                f"{where}: dataset name {name!r} is already used by {seen[name]}; give one of them a distinct `name`"
            )
        seen[name] = where


class VariationsParams(SingleParams):
    """Parameters of the `variations` flow: one dataset trained under a grid of settings, ranked by
    `metric`; the best variant that passes its gates is registered and marked `best`."""

    name: Annotated[str, safe_folder("name")] | None = Field(
        default=None, description="Folder under output_dir for the variants and leaderboard; `<dataset>-variations`."
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Preset keys, dotted (`lora.r`), to lists of values; every combination is one variant.",
    )
    zip: list[dict[str, list[Any]]] = Field(
        default_factory=list,
        description="Groups of preset keys whose value lists (of equal length) vary together, combined with the grid.",
    )
    name_template: str = Field(
        default="{dataset}_{preset}_{variation}",
        description="Each variant's folder and subflow run name. Placeholders: {dataset}, {preset}, {variation} "
        "(the varied values, compact), {index} (1-based), and every varied key with '.' as '_' ({lora_r}).",
    )
    max_variations: int = Field(default=16, ge=1, description="Refuse a grid that expands to more variants.")
    metric: str | None = Field(
        default=None,
        description="Metric the leaderboard ranks by (direction known); accuracy (classification), eval_loss (causal-LM).",
    )

    @model_validator(mode="after")
    def _variants_expand(self) -> "VariationsParams":
        """Expand the grid now: a bad key, value, count or name fails before anything runs."""
        try:
            expand_variations(self)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return self

    @property
    def folder_name(self) -> str:
        return self.name or f"{self.dataset.resolved_name}-variations"


class RegistryParams(StrictModel):
    """Parameters of the `registry` flow: look at a registry name, or move one of its aliases."""

    action: Literal["list", "show", "promote", "rollback", "diff"] = Field(
        description="`list` names or versions, `show` a version, `promote` a version to an alias, `rollback` an "
        "alias to its previous version, `diff` two versions."
    )
    name: Annotated[str, safe_folder("name")] | None = Field(
        default=None, description="The registry name (the dataset's); `list` without it lists every name."
    )
    version: str | None = Field(
        default=None, description="`show`/`diff`: a version number or alias; `promote`: the version number."
    )
    other: str | None = Field(default=None, description="`diff`: the second version number or alias.")
    alias: Annotated[str, safe_folder("alias")] = Field(
        default="production", description="`promote`/`rollback`: the alias to move."
    )
    comment: str | None = Field(default=None, description="Why the alias moves; kept with the move in the registry.")
    registry_dir: str = Field(default="runs/registry", description="The registry root.")

    @field_validator("version", "other")
    @classmethod
    def _bare_number(cls, value: str | None) -> str | None:
        """`v3` and `3` name the same version; anything else is an alias."""
        return value[1:] if value and value[0] == "v" and value[1:].isdigit() else value

    @model_validator(mode="after")
    def _action_has_its_arguments(self) -> "RegistryParams":
        needed = {"list": [], "show": ["name", "version"], "promote": ["name", "version"], "rollback": ["name"],
                  "diff": ["name", "version", "other"]}[self.action]
        missing = [field for field in needed if getattr(self, field) is None]
        if missing:
            raise ValueError(f"{self.action} needs {' and '.join(missing)}")
        if self.action == "promote" and not self.version.isdigit():
            raise ValueError(f"promote: version {self.version!r} is not a version number (3 or v3)")
        return self


def format_validation_error(error: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """One line per problem: `source: field.path: message`; an unknown key of `model` (or of a
    model inside it) names the closest valid key, or the valid ones, as unknown overrides do."""
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            fields = _model_at(model, item["loc"][:-1])
            message = f"unknown key{suggest(str(item['loc'][-1]), fields.model_fields)}" if fields else "unknown key"
        lines.append(f"{source}: {location}: {message}" if location else f"{source}: {message}")
    return "; ".join(lines)


def _model_at(model: type[BaseModel] | None, path: Iterable[str | int]) -> type[BaseModel] | None:
    """The model that a validation error's location inside `model` points into (None inside a dict)."""
    for part in path:
        if model is None:
            return None
        if isinstance(part, int):  # an item of a list: the list's model was taken already
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model in a field's type: itself, or inside `X | None`, `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_in, get_args(annotation))), None)


def load_params_file(path: str | Path, model: type[BaseModel] = SingleParams) -> BaseModel:
    """Read a YAML or JSON parameter file into `model`, one clear line on any error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))  # JSON is YAML
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML/JSON: {getattr(error, 'problem', error)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters at the top level")
    if set(raw) == {"params"} and isinstance(raw["params"], dict):  # the flow-argument form
        raw = raw["params"]
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, str(path), model)) from None
