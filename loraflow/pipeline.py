"""The pipeline, said once: each stage's name, inputs, output, core function and cache key, without Prefect.

A run walks two lists with one `PipelineRun` (the checked plan, its settings resolved once, and
what each stage has produced so far): `DATA_STAGES` (prepare, tokenize, baseline: shared by every
training on one dataset) and `TRAINING_STAGES` (train, evaluate, samples, register: once per run or
grid variant). Three walkers read the same lists, so they cannot drift apart:

- the flows run each stage as its Prefect task, cached under the stage's key (`orchestration/stages.py`);
- the plan asks Prefect's result store for each stage's key and trains nothing (`orchestration/dry_run.py`);
- the benchmarks' plain pipeline calls each stage's core function directly (`run_plain`).

A new stage is one `Stage` in a list plus its core function; the walkers need no edit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from loraflow.chat import ChatEncoding
from loraflow.data.prepare import PreparedDataset, prepare_dataset, source_fingerprint
from loraflow.data.tokenize import (
    Shard,
    collect_rejects,
    shard_file_name,
    shard_paths_by_split,
    split_into_shards,
    tokenize_shard,
)
from loraflow.devices import lease_devices
from loraflow.fingerprint import code_version, hash_json, hash_tree
from loraflow.gates import GateVerdict, check_gates, gates_pass
from loraflow.layout import atomic_write_json
from loraflow.model_process import run_model_work
from loraflow.models import model_identity
from loraflow.plan import ResolvedConfig, RunPlan, resolve_config
from loraflow.promotion import Champion, PromotionRequest
from loraflow.registry import AliasMove, Registry, RegistryVersion
from loraflow.train.launch import LaunchOptions, run_training
from loraflow.train.request import ProgressUpdate, TrainRequest, TrainResult

Log = Callable[[str], None]


def _quiet(line: str) -> None:
    """The default log of a core stage function: the flows pass Prefect's run logger instead."""


class NotProducedYet(KeyError):
    """A stage's input is the output of a stage that has not run (a plan's stage that would run)."""


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    `arguments(run)` gives the keyword arguments of `function` from the run so far (None: the stage
    does not apply to this run, e.g. a grid variant registers nothing); `cache_key(arguments)` is
    what an identical re-run is served from cache by; the result is kept in the run as `output`.
    `predict(arguments)`, where given, is the output known without running (shard paths are content
    hashes), so a plan can look later stages up before this one ran. `dry_run_keys(arguments)` gives
    the keys a plan checks, by the label it reports (one stage, several lengths or shards).
    """

    name: str
    output: str
    arguments: Callable[[PipelineRun], dict[str, Any] | None]
    function: Callable[..., Any]
    cache_key: Callable[[dict[str, Any]], str]
    predict: Callable[[dict[str, Any]], Any] | None = None
    dry_run_keys: Callable[[dict[str, Any]], dict[str, list[str]]] | None = None
    skipped: str | None = None  # what a plan says when `arguments` is None (None: it leaves the stage out)

    def keys_to_check(self, arguments: dict[str, Any]) -> dict[str, list[str]]:
        return self.dry_run_keys(arguments) if self.dry_run_keys else {self.name: [self.cache_key(arguments)]}


def fingerprint_key(stage: str, *parts: Any) -> str:
    """A cache key: the stage, the code version and the content fingerprints of its inputs."""
    return f"loraflow-{stage}-{hash_json([stage, code_version(), *parts])[:32]}"


def adapter_fingerprint(adapter_dir: str | None) -> str | None:
    """An adapter's identity is its bytes: a retrained adapter never reuses old results."""
    return hash_tree(adapter_dir) if adapter_dir else None


class PipelineRun:
    """One run through the stages: its plan, the settings resolved once, and each stage's output.

    `data_plan` is the plan whose folder holds the shared data (a grid's, for its variants);
    `max_lengths` are extra lengths to tokenise at (a grid that varies it); `registry_alias` is the
    alias a passing adapter gets (None: not registered here); `devices_at_once` is how many devices
    its model work may use at once (a grid's parallel variants), whose model processes are warmed
    while new shards are tokenised.
    """

    def __init__(self, plan: RunPlan, data_plan: RunPlan | None = None, max_lengths: Iterable[int] = (),
                 registry_alias: str | None = None, outputs: dict[str, Any] | None = None, devices_at_once: int = 1):
        self.plan, self.data_plan = plan, data_plan or plan
        self.extra_lengths = tuple(max_lengths)
        self.devices_at_once = devices_at_once
        self.registry_alias = registry_alias
        self.outputs: dict[str, Any] = dict(outputs or {})

    def __getitem__(self, output: str) -> Any:
        if output not in self.outputs:
            raise NotProducedYet(output)
        return self.outputs[output]

    @property
    def params(self):
        return self.plan.params

    @cached_property
    def config(self) -> ResolvedConfig:
        """Preset, overrides and dataset facts, resolved once per run (per variant in a grid)."""
        return resolve_config(self.plan, self["prepared"])

    @property
    def max_lengths(self) -> list[int]:
        """The lengths to tokenise at: the run's own first, then any extra ones, shortest first."""
        own = self.config.settings.max_length
        return [own, *sorted(set(self.extra_lengths) - {own})]

    @property
    def tokens_dir(self) -> Path:
        return self.data_plan.layout.data / "tokens"

    @property
    def shards(self) -> dict[str, list[str]]:
        """This run's shard paths per split, at its own `max_length`."""
        return self["shards"][self.config.settings.max_length]

    @cached_property
    def request(self) -> TrainRequest:
        """The training request: paths and settings only. A flow may replace it (trackers added)."""
        layout, shards = self.plan.layout, self.shards
        return TrainRequest(
            model_path=self.plan.model_path, task=self.params.task, settings=self.config.settings,
            labels=self.config.labels, train_shards=shards["train"], eval_shards=shards.get("validation", []),
            checkpoint_dir=str(layout.checkpoints), adapter_dir=str(layout.model), logs_dir=str(layout.logs),
            seed=self.params.seed, processes=self.config.processes,
            chat_template=self.plan.chat.template if self.plan.chat else None, packing=self.params.packing,
            quantization=self.params.quantization,
        )

    @cached_property
    def gates(self) -> dict[str, GateVerdict]:
        """The verdict of each gate in force (the profile's and the inline ones) on this run's metrics;
        judged once (the gates file is read once), when the metrics are there to judge."""
        verdicts = check_gates(self["metrics"], self.params.gate_set, self.params.gate_profile)
        return {verdict.metric: verdict for verdict in verdicts}

    @property
    def passed(self) -> bool:
        """Every critical gate passed (a failing warning gate is only reported)."""
        return gates_pass(self.gates.values())

    @property
    def promotion(self) -> PromotionRequest:
        """This run's side of the promotion decision: the rule, the verdicts, the baseline, and the
        champion as evaluated on this run's test split (the `champion` stage), when it was."""
        if "champion" not in self.outputs and champion_arguments(self) is not None:
            raise NotProducedYet("champion")  # a plan's champion evaluation that would run
        request = self.params.promotion(self.gates.values(), self.outputs.get("baseline") or {})
        return request.model_copy(update={"champion": self.outputs.get("champion")})


def expected_shards(prepared: PreparedDataset, tokenizer_path: str, task: str, max_length: int, shard_size: int,
                    out_dir: Path, chat: ChatEncoding | None = None) -> dict[str, list[str]]:
    """The shard paths tokenisation will return, without tokenising (file names are content hashes)."""
    shards = split_into_shards(prepared, shard_size, chat)
    names = [shard_file_name(shard, tokenizer_path, task, max_length) for shard in shards]
    return shard_paths_by_split([str(Path(out_dir) / name) for name in names])


# --- the core function of each stage, and its cache key -------------------------------------------


def prepare_key(arguments: dict[str, Any]) -> str:
    """The input files' bytes and the preparation settings: unchanged data is never re-read."""
    return fingerprint_key("prepare", source_fingerprint(arguments["spec"], arguments["task"]),
                           str(arguments["data_dir"]))


def tokenize_shard_key(arguments: dict[str, Any]) -> str:
    shard: Shard = arguments["shard"]
    return fingerprint_key("tokenize", shard.model_dump(exclude={"source"}), model_identity(arguments["tokenizer_path"]),
                           arguments["task"], arguments["max_length"], str(arguments["out_dir"]))


def shard_arguments(arguments: dict[str, Any], max_length: int) -> list[dict[str, Any]]:
    """The arguments of each shard's tokenisation at `max_length`: the unit the cache keeps."""
    common = {key: arguments[key] for key in ("tokenizer_path", "task", "out_dir")}
    return [{"shard": shard, **common, "max_length": max_length}
            for shard in split_into_shards(arguments["prepared"], arguments["shard_size"], arguments["chat"])]


def tokenize_label(max_lengths: list[int], length: int) -> str:
    """`tokenize` for the run's own length (first in `max_lengths`), `tokenize-<length>` for an extra
    length a variations grid asks for."""
    return "tokenize" if length == max_lengths[0] else f"tokenize-{length}"


def tokenize_all(prepared: PreparedDataset, tokenizer_path: str, task: str, max_lengths: list[int], shard_size: int,
                 out_dir: Path, chat: ChatEncoding | None = None, log: Log = _quiet) -> dict[int, dict[str, list[str]]]:
    """Every split tokenised at each length, one shard after another (the flows map shards on Dask);
    a chat dataset's shards are templated by `chat`."""
    arguments = {"prepared": prepared, "tokenizer_path": tokenizer_path, "task": task, "shard_size": shard_size,
                 "out_dir": out_dir, "chat": chat}
    shards = {}
    for length in max_lengths:
        paths = [tokenize_shard(**shard) for shard in shard_arguments(arguments, length)]
        report_rejects(prepared, paths, length, log)
        shards[length] = shard_paths_by_split(paths)
    return shards


def report_rejects(prepared: PreparedDataset, paths: list[str], max_length: int, log: Log) -> None:
    rejects_path, rejected = collect_rejects(prepared, paths, max_length)
    if rejects_path:
        log(f"{rejected} rows left out: too long for max_length={max_length}; see {rejects_path}")


def _tokenize_dry_run_keys(arguments: dict[str, Any]) -> dict[str, list[str]]:
    lengths = arguments["max_lengths"]
    return {tokenize_label(lengths, length): [tokenize_shard_key(shard) for shard in shard_arguments(arguments, length)]
            for length in lengths}


def _predict_shards(arguments: dict[str, Any]) -> dict[int, dict[str, list[str]]]:
    return {length: expected_shards(arguments["prepared"], arguments["tokenizer_path"], arguments["task"], length,
                                    arguments["shard_size"], arguments["out_dir"], arguments["chat"])
            for length in arguments["max_lengths"]}


def _one_key_per_shard(arguments: dict[str, Any]) -> str:
    """Tokenisation is cached shard by shard (`tokenize_shard_key`), never as a whole."""
    raise TypeError("tokenize is cached per shard: use tokenize_shard_key")


def evaluate_key(arguments: dict[str, Any]) -> str:
    """The adapter's bytes and the test shards; the baseline (no adapter) only on what changes the
    bare model's scores, not on LoRA settings."""
    config: ResolvedConfig = arguments["config"]
    settings = config.settings
    baseline = [config.model_identity, config.task, config.labels, settings.eval_batch_size, config.seed,
                settings.max_length, config.generation.model_dump() if config.generation else None]
    return fingerprint_key("evaluate", config.fingerprint if arguments["adapter_dir"] else baseline,
                           arguments["test_shards"], adapter_fingerprint(arguments["adapter_dir"]),
                           str(arguments["out_path"]))


def evaluate(config: ResolvedConfig, test_shards: list[str], adapter_dir: str | None, out_path: Path,
             log: Log = _quiet) -> dict:
    """Metrics on the held-out test split (`adapter_dir=None`: the bare base model), computed in a
    model process on one leased device and written to `out_path`."""
    what = f"{'evaluation' if adapter_dir else 'baseline'} of {config.name!r}"
    with lease_devices(1, what, log=log) as lease:
        metrics = run_model_work(
            "loraflow.evaluate:evaluate_model", config.model, config.task, config.labels, test_shards, adapter_dir,
            eval_batch_size=config.settings.eval_batch_size, seed=config.seed, generation=config.generation,
            lease=lease,
        )
    atomic_write_json(out_path, metrics)
    scalars = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    log(f"{'adapter' if adapter_dir else 'baseline'} metrics: {scalars}")
    return metrics


def samples_key(arguments: dict[str, Any]) -> str:
    return fingerprint_key("samples", arguments["config"].fingerprint, adapter_fingerprint(arguments["adapter_dir"]),
                           str(arguments["prompts_path"]), str(arguments["out_path"]))


def sample_predictions(config: ResolvedConfig, adapter_dir: str, prompts_path: str, out_path: Path,
                       log: Log = _quiet) -> str:
    """The held-out sample prompts through the adapter, so a person can eyeball its output."""
    with lease_devices(1, f"sample predictions of {config.name!r}", log=log) as lease:
        rows = run_model_work(
            "loraflow.samples:run_sample_prompts", config.model, config.task, config.labels, adapter_dir, prompts_path,
            out_path, max_length=config.settings.max_length, max_new_tokens=config.settings.max_new_tokens, lease=lease,
        )
    log(f"wrote {len(rows)} sample predictions to {out_path}")
    return str(out_path)


def champion_arguments(run: PipelineRun) -> dict[str, Any] | None:
    """The version the alias points at now, to evaluate on this run's test split; None when there is
    none, the rule does not compare (`promote_if` other than `better`), or it is this very version."""
    if run.registry_alias is None or run.params.promote_if != "better":
        return None
    index = Registry(run.params.registry_root).index(run.config.name)
    number = index.aliases.get(run.registry_alias)
    if number is None or index.get(number).key == run.config.fingerprint:
        return None
    return {"config": run.config, "test_shards": run.shards["test"], "champion": index.get(number),
            "out_path": run.plan.layout.eval / "champion.json"}


def champion_key(arguments: dict[str, Any]) -> str:
    """This run's config and test split, and the champion's own bytes: a rollback or a new champion
    is evaluated again."""
    champion: RegistryVersion = arguments["champion"]
    found = Path(champion.path).is_dir()
    return fingerprint_key("champion", arguments["config"].fingerprint, arguments["test_shards"], champion.version,
                           adapter_fingerprint(champion.path) if found else None, str(arguments["out_path"]))


def evaluate_champion(config: ResolvedConfig, test_shards: list[str], champion: RegistryVersion, out_path: Path,
                      log: Log = _quiet) -> Champion:
    """The champion's metrics on this run's own test split, or in one line why it cannot be evaluated
    (its folder is damaged, it adapts another base model, or it predicts other labels)."""
    card_config = champion.card.get("config") or {}
    problem = Registry.problem(champion)
    if problem:
        unavailable = f"its folder {champion.path} {problem}"
    elif champion.card.get("model_identity") != config.model_identity:
        unavailable = f"it adapts another base model ({champion.card.get('base_model')})"
    elif card_config.get("labels") != config.labels:
        unavailable = f"it predicts other labels ({card_config.get('labels')})"
    else:
        return Champion(version=champion.version, metrics=evaluate(config, test_shards, champion.path, out_path, log))
    log(f"{config.name} v{champion.version} cannot be evaluated on this run's test split: {unavailable}")
    return Champion(version=champion.version, unavailable=unavailable)


def export_key(arguments: dict[str, Any]) -> str:
    """The base model and the adapter's bytes: a retrained adapter is merged again."""
    return fingerprint_key("export-merged", arguments["config"].model_identity,
                           adapter_fingerprint(arguments["adapter_dir"]), str(arguments["out_dir"]))


def export_merged(config: ResolvedConfig, adapter_dir: str, out_dir: Path, log: Log = _quiet) -> str:
    """`export: merged`: the base with the adapter merged in, written in a model process on a leased
    device (a model is never loaded in the flow's process)."""
    with lease_devices(1, f"merged export of {config.name!r}", log=log) as lease:
        merged = run_model_work("loraflow.export:export_merged", config.model, adapter_dir, out_dir, lease=lease)
    log(f"merged model written to {merged}")
    return merged


def train_key(arguments: dict[str, Any]) -> str:
    """The resolved config's fingerprint (dataset, settings, base model, code) and the shards."""
    config: ResolvedConfig = arguments["config"]
    request: TrainRequest = arguments["request"]
    return fingerprint_key("train", config.fingerprint, request.train_shards, request.eval_shards, request.adapter_dir)


def train(config: ResolvedConfig, request: TrainRequest, launch: LaunchOptions | None = None, log: Log = _quiet,
          on_progress: Callable[[ProgressUpdate], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train in a torchrun process tree on this host's share of `config.processes` leased devices."""
    launch = launch or LaunchOptions()
    devices = config.processes // launch.nnodes
    with lease_devices(devices, f"training {config.name!r}", log=log, should_stop=should_stop) as lease:
        nodes = f" on each of {launch.nnodes} nodes" if launch.nnodes > 1 else ""
        log(f"training on {', '.join(lease.labels)}{nodes}: {config.processes} process(es), "
            f"{config.total_steps} optimiser steps planned")
        return run_training(request, lease, launch, on_progress=on_progress, log=log, should_stop=should_stop)


def register_key(arguments: dict[str, Any]) -> str:
    """Keyed on the gates, the promotion rule and the registry folder's state too: the same adapter
    judged otherwise is a new verdict, and a damaged version folder is restored instead of served
    from cache. Not on the baseline: the config keys it already, and a plan has none to give."""
    config: ResolvedConfig = arguments["config"]
    registry_root, promotion = arguments["registry_root"], arguments.get("promotion")
    return fingerprint_key(
        "register", config.fingerprint, Registry(registry_root).damage(config.name, config.fingerprint),
        adapter_fingerprint(arguments["adapter_dir"]), registry_root, arguments["passed"], arguments["alias"],
        arguments["gates"], promotion.model_dump(exclude={"baseline"}) if promotion else None, arguments.get("merged"),
    )


def register_and_decide(
    registry_root: str, config: ResolvedConfig, adapter_dir: str, metrics: dict, passed: bool, alias: str | None,
    gates: dict[str, float] | None = None, promotion: PromotionRequest | None = None, merged: str | None = None,
    flow_run_id: str | None = None, log: Log = _quiet,
) -> tuple[RegistryVersion, AliasMove | None]:
    """Register a version keyed by the config fingerprint (identical inputs never add one), record
    this verdict on it (with the run's merged export, if any), and let the promotion rule decide, under the registry's lock, whether `alias`
    (`production`; `best` for a grid's winner) moves to it. Returns the version and the move made."""
    card = {"task": config.task, "base_model": config.model, "model_identity": config.model_identity,
            "dataset_fingerprint": config.dataset_fingerprint, "code_version": config.code_version,
            "config": config.model_dump()}
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    version, outcome, move = Registry(registry_root).register_and_promote(
        config.name, adapter_dir, config.fingerprint, card, scalars, passed, gates=gates, alias=alias,
        flow_run_id=flow_run_id, promotion=promotion, merged=merged)
    said = {"created": "registered", "found": "already registered as",
            "restored": "restored the missing or incomplete folder of"}[outcome]
    log(f"{said} {config.name} v{version.version} ({version.path}); verdict {version.verdict}: "
        f"{'passed' if passed else 'failed'}")
    if version.decision is not None:
        moved = "->" if version.decision.promote else "stays; not"
        log(f"{config.name}: alias {alias!r} {moved} v{version.version}: {version.decision.reason}")
    return version, move


def register(*arguments: Any, **keywords: Any) -> RegistryVersion:
    """`register_and_decide`, for the walkers that keep only the version."""
    return register_and_decide(*arguments, **keywords)[0]


# --- the stage lists --------------------------------------------------------------------------------


DATA_STAGES: list[Stage] = [
    Stage(
        name="prepare", output="prepared", function=prepare_dataset, cache_key=prepare_key,
        arguments=lambda run: {"spec": run.params.dataset, "task": run.params.task, "data_dir": run.data_plan.layout.data},
    ),
    Stage(
        name="tokenize", output="shards", function=tokenize_all, cache_key=_one_key_per_shard,
        arguments=lambda run: {"prepared": run["prepared"], "tokenizer_path": run.plan.model_path,
                               "task": run.params.task, "max_lengths": run.max_lengths,
                               "shard_size": run.params.shard_size, "out_dir": run.tokens_dir, "chat": run.plan.chat},
        predict=_predict_shards, dry_run_keys=_tokenize_dry_run_keys,
    ),
    Stage(
        name="baseline", output="baseline", function=evaluate, cache_key=evaluate_key,
        arguments=lambda run: {"config": run.config, "test_shards": run.shards["test"], "adapter_dir": None,
                               "out_path": run.data_plan.layout.eval / "baseline.json"},
    ),
]

TRAINING_STAGES: list[Stage] = [
    Stage(
        name="train", output="trained", function=train, cache_key=train_key,
        arguments=lambda run: {"config": run.config, "request": run.request},
    ),
    Stage(
        name="evaluate", output="metrics", function=evaluate, cache_key=evaluate_key,
        arguments=lambda run: {"config": run.config, "test_shards": run.shards["test"],
                               "adapter_dir": run["trained"].adapter_dir, "out_path": run.plan.layout.eval / "metrics.json"},
    ),
    Stage(
        name="samples", output="samples", function=sample_predictions, cache_key=samples_key,
        arguments=lambda run: {"config": run.config, "adapter_dir": run["trained"].adapter_dir,
                               "prompts_path": run["prepared"].sample_prompts_path,
                               "out_path": run.plan.layout.samples / "predictions.jsonl"},
    ),
    Stage(
        name="champion", output="champion", function=evaluate_champion, cache_key=champion_key,
        arguments=champion_arguments,
    ),
    Stage(
        name="export", output="merged", function=export_merged, cache_key=export_key,
        arguments=lambda run: None if run.params.export != "merged" else {
            "config": run.config, "adapter_dir": run["trained"].adapter_dir, "out_dir": run.plan.layout.root / "merged"},
    ),
    Stage(
        name="register", output="version", function=register, cache_key=register_key, skipped="best variant only",
        arguments=lambda run: None if run.registry_alias is None else {
            "registry_root": run.params.registry_root, "config": run.config, "adapter_dir": run["trained"].adapter_dir,
            "metrics": run["metrics"], "passed": run.passed, "alias": run.registry_alias,
            "gates": run.params.gate_thresholds, "promotion": run.promotion, "merged": run.outputs.get("merged")},
    ),
]


def stages_through(stages: list[Stage], last: str) -> list[Stage]:
    """The stages up to and including the one named `last` (a benchmark that stops before training)."""
    names = [stage.name for stage in stages]
    return stages[: names.index(last) + 1]


def run_plain(stages: list[Stage], run: PipelineRun, timed: Callable[[str], Any]) -> PipelineRun:
    """The stages without Prefect, one after another: what the benchmarks compare the flows against.
    `timed(name)` is a context manager that times each stage."""
    for stage in stages:
        arguments = stage.arguments(run)
        if arguments is None:
            continue
        with timed(stage.name):
            run.outputs[stage.output] = stage.function(**arguments)
    return run
