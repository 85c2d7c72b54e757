"""Train one LoRA adapter with the transformers Trainer and peft: checkpoints, resume, progress.

The flow layer calls `train_adapter` once per training run. Everything it needs is in a
`TrainRequest` (paths and settings, no tensors), and everything it produces is on disk:
checkpoints that a restarted run resumes from, `metrics.jsonl`, and the final adapter.
"""

from __future__ import annotations

import gc
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from loraflow.data.prepare import label_map
from loraflow.errors import ConfigError, DataError, TrainingStopped
from loraflow.layout import atomic_write_dir, atomic_write_json
from loraflow.quantization import quantized_loading
from loraflow.task_table import classifier
from loraflow.train.checkpoints import (  # noqa: F401  (config_fingerprint: part of this module's API)
    config_fingerprint,
    find_resumable_checkpoint,
    mark_checkpoint_complete,
    prepare_checkpoints,
    read_trainer_state,
)
from loraflow.train.data import TokenizedDataset, collator_for
from loraflow.train.device import DeviceChoice, pick_device
from loraflow.train.packing import packed_rows, packing_collator
from loraflow.train.reporting import guard_trackers, report_to
from loraflow.train.request import (
    ProgressUpdate,
    TrainRequest,
    TrainResult,
    smaller_batch,
)

STOP_CHECK_SECONDS = 1.0


def tokenizer_with_padding(model_path: str):
    """A fresh tokenizer for batching a model's inputs: decoder-only models often ship without a pad
    token, so eos stands in. (Tokenising shards uses `loraflow.data.tokenize.load_tokenizer`: cached
    per thread, fast tokenizers only.)"""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_path: str, task: str, labels: list[str] | None, dtype=None, quantization: str | None = None):
    """The base model for `task`; classification gets a fresh head sized and named by `labels`; a causal
    LM is loaded quantized for QLoRA training when `quantization` says so."""
    dtype = dtype or torch.float32  # transformers 5 defaults to the checkpoint's dtype; be explicit
    if not classifier(task):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **quantized_loading(quantization, dtype))
        # peft's k-bit preparation: norms in fp32, inputs that carry gradients into the frozen quantized layers
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False) if quantization else model
    if not labels:
        raise ConfigError("labels: sequence classification needs the list of label names")
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, dtype=dtype, num_labels=len(labels), **label_map(labels)
    )
    if model.config.pad_token_id is None:  # decoder classifiers find each row's last token by the pad id
        model.config.pad_token_id = model.config.eos_token_id
    return model


def model_dtype(plan: DeviceChoice) -> torch.dtype:
    """Weights in bf16 where the device trains in bf16 (half the memory); fp32 elsewhere, for AMP or CPU."""
    return torch.bfloat16 if plan.bf16 else torch.float32


def train_adapter(
    request: TrainRequest,
    on_progress: Callable[[ProgressUpdate], None] | None = None,
    log: Callable[[str], None] = print,
    should_stop: Callable[[], bool] | None = None,
    callbacks: tuple[TrainerCallback, ...] = (),
    checkpoints_prepared: bool = False,
    back_off_out_of_memory: bool = True,
) -> TrainResult:
    """Train (or resume training) a LoRA adapter and save it to `request.adapter_dir`.

    Out of memory, it retries from the last complete checkpoint with a smaller per-device batch
    and more accumulation (the same effective batch), down to 1, then raises `TrainingOutOfMemory`;
    with `back_off_out_of_memory=False` the error is raised instead (a distributed run's other ranks
    would wait for the failed one for ever: its launcher restarts them all with the smaller batch).
    `should_stop` is polled about once a second: when it answers True the trainer saves a
    checkpoint and `TrainingStopped` is raised, so a cancelled run can be resumed later.
    `callbacks` are extra Trainer callbacks (instrumentation, fault injection).
    `checkpoints_prepared`: the launcher already ran `prepare_checkpoints`.
    """
    plan = pick_device()
    train_data = TokenizedDataset(request.train_shards)
    if len(train_data) == 0:
        raise DataError(f"train split is empty ({len(request.train_shards)} shards)")
    eval_data = TokenizedDataset(request.eval_shards) if request.eval_shards else None
    train_rows = packed_rows(train_data.columns, request.settings.max_length) if request.packing else train_data
    settings = request.settings
    while True:
        attempt = request.model_copy(update={"settings": settings})
        resume_from = find_resumable_checkpoint(request.checkpoint_dir, log) if checkpoints_prepared else \
            prepare_checkpoints(attempt, log)
        try:
            return _train_once(attempt, plan, resume_from, train_data, train_rows, eval_data, on_progress, log,
                               should_stop, callbacks)
        except torch.cuda.OutOfMemoryError as error:
            if not back_off_out_of_memory:
                raise
            settings = smaller_batch(settings, error, log)
            checkpoints_prepared = False
        _release_memory()  # out here the error's traceback no longer pins the failed attempt's model


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train_once(
    request: TrainRequest,
    plan: DeviceChoice,
    resume_from: str | None,
    train_data: TokenizedDataset,
    train_rows: Any,
    eval_data: TokenizedDataset | None,
    on_progress: Callable[[ProgressUpdate], None] | None,
    log: Callable[[str], None],
    should_stop: Callable[[], bool] | None,
    callbacks: tuple[TrainerCallback, ...],
) -> TrainResult:
    resumed_from_step = None
    if resume_from:
        state = read_trainer_state(Path(resume_from))
        resumed_from_step = int(state["global_step"])
        log(f"resuming from {Path(resume_from).name} (step {resumed_from_step} of {state.get('max_steps', '?')})")

    set_seed(request.seed)  # before loading: the classifier head and LoRA weights are initialised here
    tokenizer = tokenizer_with_padding(request.model_path)
    if request.chat_template is not None:  # inference then renders conversations as training did
        tokenizer.chat_template = request.chat_template
    model = _peft_model(request, plan)
    stopper = _StopWhenAsked(should_stop)
    trainer = Trainer(
        model=model,
        args=_training_arguments(request, plan, with_eval=eval_data is not None),
        # Packed rows: the same collator serves evaluation, each unpacked row its own example.
        data_collator=packing_collator(tokenizer, model.config._attn_implementation) if request.packing
        else collator_for(request.task, tokenizer),
        train_dataset=train_rows,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=[
            _ProgressReporter(Path(request.logs_dir) / "metrics.jsonl", on_progress, log),
            _MarkCheckpointsComplete(),
            stopper,
            *callbacks,
        ],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; _ProgressReporter says it in one line
    guard_trackers(trainer, request.tracking, log)
    output = trainer.train(resume_from_checkpoint=resume_from)
    if stopper.stopped_at is not None:
        raise TrainingStopped(
            f"training stopped on request at step {stopper.stopped_at} of {trainer.state.max_steps}; "
            f"checkpoint-{stopper.stopped_at} is saved in {request.checkpoint_dir}: run again to resume"
        )

    if trainer.is_world_process_zero():
        _save_adapter(trainer.model, tokenizer, request)
    steps_this_run = output.global_step - (resumed_from_step or 0)
    samples_per_second = output.metrics.get("train_samples_per_second")
    tokens_per_sample = train_data.num_tokens() / len(train_rows)  # a sample is a packed row when packing
    return TrainResult(
        adapter_dir=str(Path(request.adapter_dir)),
        global_step=output.global_step,
        epochs=float(trainer.state.epoch or 0.0),
        train_loss=output.training_loss if steps_this_run > 0 else None,
        resumed_from_step=resumed_from_step,
        samples_per_second=samples_per_second,
        tokens_per_second=samples_per_second * tokens_per_sample if samples_per_second else None,
        train_runtime_s=float(output.metrics.get("train_runtime", 0.0)),
        device=plan.device,
        precision="bf16" if plan.bf16 else "fp16" if plan.fp16 else "fp32",
        batch_size=request.settings.batch_size,
        gradient_accumulation_steps=request.settings.gradient_accumulation_steps,
        peak_memory_mb=_peak_memory_mb(plan),
    )


def _peak_memory_mb(plan: DeviceChoice) -> float:
    if plan.device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _peft_model(request: TrainRequest, plan: DeviceChoice):
    lora = request.settings.lora
    classification = classifier(request.task)
    config = LoraConfig(
        # SEQ_CLS makes peft train the classifier head in full (modules_to_save); LoRA alone cannot fit a fresh head
        task_type=TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=None if lora.target_modules == "auto" else lora.target_modules,  # None: peft's per-model default
    )
    base = load_base_model(request.model_path, request.task, request.labels, dtype=model_dtype(plan),
                           quantization=request.quantization)
    return get_peft_model(base, config)


def _training_arguments(request: TrainRequest, plan: DeviceChoice, with_eval: bool) -> TrainingArguments:
    settings = request.settings
    return TrainingArguments(
        output_dir=request.checkpoint_dir,
        num_train_epochs=settings.num_epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,  # transformers 5: a value below 1 is a share of all steps
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        eval_strategy="steps" if with_eval else "no",
        eval_steps=settings.save_steps if with_eval else None,
        prediction_loss_only=True,
        bf16=plan.bf16,
        fp16=plan.fp16,
        use_cpu=plan.device == "cpu",
        ddp_backend="gloo" if plan.device == "cpu" and request.processes > 1 else None,
        ddp_find_unused_parameters=False,  # LoRA trains a fixed set of parameters: skip DDP's graph walk
        # The Trainer scales each rank's loss by the number of processes so that a loss averaged over
        # all ranks' tokens comes out right; a classifier averages over its own batch, so that scaling
        # would multiply its gradients (and its logged loss) by the number of processes.
        average_tokens_across_devices=not classifier(request.task),
        seed=request.seed,
        data_seed=request.seed,
        report_to=report_to(request.tracking),
        run_name=request.tracking.run_name if request.tracking else None,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=plan.device == "cuda",
        remove_unused_columns=False,  # rows hold exactly the model inputs already
        label_names=["labels"],
    )


class _MarkCheckpointsComplete(TrainerCallback):
    """The Trainer writes a checkpoint file by file; the marker, written last and atomically, vouches for all of it."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # the rank that wrote the files vouches for them
            mark_checkpoint_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class _StopWhenAsked(TrainerCallback):
    """Polls `should_stop` after the first step, then at most once per STOP_CHECK_SECONDS; on yes,
    save a checkpoint and stop. In a distributed run the ranks agree at every step (one tiny
    all-reduce): a rank that stopped alone would leave the others waiting in the next all-reduce."""

    def __init__(self, should_stop: Callable[[], bool] | None):
        self.should_stop, self.checked_at, self.stopped_at = should_stop, float("-inf"), None

    def on_step_end(self, args, state, control, **kwargs):
        asked = False
        if self.should_stop is not None and time.monotonic() - self.checked_at >= STOP_CHECK_SECONDS:
            self.checked_at = time.monotonic()
            asked = self.should_stop()
        if args.world_size > 1:
            flag = torch.tensor([int(asked)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            asked = bool(flag.item())
        if asked:
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step


class _ProgressReporter(TrainerCallback):
    """On every Trainer log event: a metrics.jsonl line, a one-line message, and a ProgressUpdate."""

    def __init__(self, metrics_path: Path, on_progress: Callable[[ProgressUpdate], None] | None, log):
        self.metrics_path, self.on_progress, self.log = metrics_path, on_progress, log
        self.started_at, self.first_step = time.monotonic(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        # After a resume global_step starts high: the ETA must count only steps run in this process.
        self.started_at, self.first_step = time.monotonic(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:  # one metrics.jsonl and one progress line per step, whatever the ranks
            return
        logs = logs or {}
        epoch = float(state.epoch or 0.0)
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            record = {**logs, "step": state.global_step, "epoch": epoch, "timestamp": time.time()}
            handle.write(json.dumps(record) + "\n")
        done = state.global_step - self.first_step
        eta = (time.monotonic() - self.started_at) / done * (state.max_steps - state.global_step) if done > 0 else None
        update = ProgressUpdate(
            step=state.global_step,
            max_steps=state.max_steps,
            epoch=epoch,
            loss=logs.get("loss"),
            learning_rate=logs.get("learning_rate"),
            eta_seconds=eta,
        )
        self.log(_progress_line(update, logs))
        if self.on_progress is not None:
            self.on_progress(update)


def _progress_line(update: ProgressUpdate, logs: dict[str, Any]) -> str:
    """`step 40/120 epoch 2.00 loss 0.4123 lr 1.2e-03 eta 35s`, with whichever values this event has."""
    parts = [f"step {update.step}/{update.max_steps}", f"epoch {update.epoch:.2f}"]
    for key in ("loss", "eval_loss", "train_loss"):
        if key in logs:
            parts.append(f"{key} {logs[key]:.4f}")
    if update.learning_rate is not None:
        parts.append(f"lr {update.learning_rate:.1e}")
    if "train_runtime" in logs:
        parts.append(f"done in {logs['train_runtime']:.0f}s")
    elif update.eta_seconds is not None:
        parts.append(f"eta {update.eta_seconds:.0f}s")
    return " ".join(parts)


def _save_adapter(model, tokenizer, request: TrainRequest) -> None:
    """Adapter, tokenizer (with a chat run's template) and label map, swapped in whole."""

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if classifier(request.task):
            atomic_write_json(staging / "label_map.json", label_map(request.labels or []))

    atomic_write_dir(request.adapter_dir, write)
