"""Training throughput: loraflow's training task against a plain peft + Trainer script.

    .venv/bin/python benchmarks/training_throughput.py            # 3 rounds on the MiniLM demo data
    .venv/bin/python benchmarks/training_throughput.py --smoke    # a few rows and steps

Both train a LoRA adapter on the same prepared demo split with the same settings (the
classification preset: epochs, batch, learning rate, warm-up, weight decay, LoRA rank/alpha/
dropout/targets, checkpoint and evaluation every `save_steps`, seed). loraflow runs its
training task (`tasks.training.train_adapter_task`, with its concurrency slot, progress
artifact and checkpoint bookkeeping) inside a flow against a running Prefect server; the
plain script, written out below, tokenises the same JSONL with the same tokenizer and calls
`Trainer.train()`. Samples/s is the Trainer's own `train_samples_per_second`; tokens/s
multiplies it by the mean number of real (unpadded) tokens per training row.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/<file>.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bench

TARGET = "loraflow's training task at least 0.95x the plain script's samples/s and tokens/s"


def loraflow_task(args: dict[str, Any]) -> dict[str, Any]:
    """The training task inside a flow, as the `single` flow runs it."""
    from prefect import flow

    from loraflow.plan import ResolvedConfig
    from loraflow.train.request import TrainRequest
    from tasks.training import train_adapter_task

    config = ResolvedConfig.model_validate(args["config"])
    request = TrainRequest.model_validate(args["request"])

    @flow(name="benchmark-training")
    def training():
        task = train_adapter_task.with_options(result_storage=Path(args["out"]) / "cache")
        return task(config, request, "benchmark-gpu")

    trained = training()
    return {"samples_per_second": trained.samples_per_second, "tokens_per_second": trained.tokens_per_second,
            "runtime": trained.train_runtime_s}


def plain_script(args: dict[str, Any]) -> dict[str, Any]:
    """What a user writes with peft and the Trainer directly, given the same settings."""
    import json

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    settings, labels, seed = args["settings"], args["labels"], args["seed"]
    tokenizer = AutoTokenizer.from_pretrained(args["model"])

    def rows(path: str) -> list[dict[str, Any]]:
        records = [json.loads(line) for line in open(path, encoding="utf-8")]
        encoded = tokenizer([r["text"] for r in records], truncation=True, max_length=settings["max_length"])
        return [{"input_ids": ids, "attention_mask": mask, "labels": r["label_id"]}
                for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], records)]

    train, validation = rows(args["train"]), rows(args["validation"])
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        args["model"], num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    lora = settings["lora"]
    model = get_peft_model(model, LoraConfig(
        task_type=TaskType.SEQ_CLS, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
    ))
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args["out"], num_train_epochs=settings["num_epochs"],
            per_device_train_batch_size=settings["batch_size"], per_device_eval_batch_size=settings["eval_batch_size"],
            gradient_accumulation_steps=settings["gradient_accumulation_steps"], learning_rate=settings["learning_rate"],
            weight_decay=settings["weight_decay"], warmup_steps=settings["warmup_ratio"],
            logging_steps=settings["logging_steps"], save_steps=settings["save_steps"],
            save_total_limit=settings["save_total_limit"], eval_strategy="steps", eval_steps=settings["save_steps"],
            prediction_loss_only=True, bf16=bf16, fp16=cuda and not bf16, use_cpu=not cuda,
            seed=seed, data_seed=seed, report_to="none", disable_tqdm=True,
        ),
        train_dataset=train,
        eval_dataset=validation,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    metrics = trainer.train().metrics
    samples_per_second = metrics["train_samples_per_second"]
    tokens_per_row = sum(len(row["input_ids"]) for row in train) / len(train)
    return {"samples_per_second": samples_per_second, "tokens_per_second": samples_per_second * tokens_per_row,
            "runtime": metrics["train_runtime"]}


def main(argv: Sequence[str] | None = None) -> bench.Report:
    args = bench.parse_arguments(bench.argument_parser(__doc__, repeat=3), argv)
    report = bench.Report("Training throughput", TARGET, __file__, argv)
    with bench.session(args) as session:
        data = bench.prepare_pipeline(bench.single_params(session.work / "data", args))

        def loraflow() -> bench.Measurement:
            out = next(session.outputs)
            request = data.request.model_copy(update={
                "checkpoint_dir": str(out / "checkpoints"), "adapter_dir": str(out / "model"), "logs_dir": str(out / "logs"),
            })
            return bench.run_child(__file__, "loraflow", {"config": data.config.model_dump(mode="json"),
                                                    "request": request.model_dump(mode="json"), "out": str(out)}, session.env)

        def plain() -> bench.Measurement:
            return bench.run_child(__file__, "plain", {
                "model": data.config.model, "settings": data.config.settings.model_dump(mode="json"),
                "labels": data.config.labels, "seed": data.config.seed, "out": str(next(session.outputs)),
                "train": data["prepared"].splits["train"], "validation": data["prepared"].splits["validation"],
            }, session.env)

        runs = bench.interleaved({"plain peft + Trainer": plain, "loraflow training task": loraflow}, args.repeat)
    plain_runs = runs["plain peft + Trainer"]
    reference = {key: bench.median([run.result[key] for run in plain_runs]) for key in ("samples_per_second", "tokens_per_second")}
    rows = []
    for name, measured in runs.items():
        samples, tokens = (bench.median([run.result[key] for run in measured]) for key in reference)
        rows.append([name, f"{samples:.1f}", bench.ratio(samples, reference["samples_per_second"]), f"{tokens:,.0f}",
                     bench.ratio(tokens, reference["tokens_per_second"]), f"{bench.median([r.result['runtime'] for r in measured]):.1f}",
                     f"{bench.median([r.peak_mb for r in measured]):.0f}", len(measured)])
    report.table(
        f"Training, {data.config.train_rows} rows x {data.config.settings.num_epochs:g} epochs "
        f"({data.config.total_steps} steps), medians of rounds:",
        ["variant", "samples/s", "vs plain", "tokens/s", "vs plain", "train s", "peak MB", "runs"],
        rows,
    )
    gpu = bench.gpu_name()
    report.note(("no GPU on this machine: CPU fp32 only. " if gpu == "none" else f"GPU: {gpu}. ")
                + "Model FLOPs utilisation of a causal-LM LoRA on a GPU is not measured by this benchmark")
    if args.smoke:
        report.note("smoke run: a few rows and steps; the ratios say nothing about the target")
    return bench.finish(report, args)


if __name__ == "__main__":
    bench.main_guard(main, {"loraflow": loraflow_task, "plain": plain_script})
