"""Preprocessing scale: preparing and tokenising generated rows with the Dask task runner,
against the same core code in one process and against `datasets.Dataset.map`.

    .venv/bin/python benchmarks/preprocessing_scale.py                        # 10k, 100k, 1M rows
    .venv/bin/python benchmarks/preprocessing_scale.py --sizes 10000,100000   # quicker
    .venv/bin/python benchmarks/preprocessing_scale.py --smoke

Each variant reads the same generated CSV of short labelled sentences and tokenises it with
the bundled MiniLM tokenizer at the classification preset's max_length:
- `one process`: `prepare_dataset`, then `tokenize_shard` over `split_into_shards`, in a loop (the
  fast tokenizer's Rust encoder runs its batches on every core by itself);
- `one process, 1 tokenizer thread`: the same with `TOKENIZERS_PARALLELISM=false`, the
  one-core reference that shows how much of the machine the plain process already uses;
- `dask`: the flow's own stages against a running server: `prepare_dataset_task`, then the
  tokenisation subflow on the `DaskTaskRunner` the flow picks (a local cluster of threads,
  of worker processes only for big data: see `tasks.data.dask_task_runner`);
- `dask, processes`: the same with a local cluster of two worker processes at any size;
- `datasets.map`: `Dataset.from_csv`, then `map(batched=True, num_proc=2)` with the same
  tokenizer, truncation and max_length (no validation, normalisation, dedupe or split).
Each runs in its own process; time is measured from the first read to the last write (the
interpreter's imports are left out), peak memory over the whole process tree.
"""

from __future__ import annotations

import csv
import importlib.util
import random
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/<file>.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bench

TASK = "sequence-classification"
SIZES = (10_000, 100_000, 1_000_000)
SMOKE_SIZES = (300, 600)
ONE_THREAD = "one process, 1 tokenizer thread"
VARIANTS = ("one process", ONE_THREAD, "dask", "dask, processes", "datasets.map")
HAS_DATASETS = importlib.util.find_spec("datasets") is not None  # the `bench` extra
TARGET = ("at 1M rows on 2 cores: dask at least 1.6x faster than one process and no slower than "
          "datasets.map; cost linear in rows; peak memory reported and bounded")
_SUBJECTS = ("the council", "a local team", "the central bank", "researchers", "the new startup", "fans",
             "the minister", "engineers", "the orchestra", "voters", "the museum", "a hospital")
_VERBS = ("announced", "delayed", "celebrated", "questioned", "launched", "rejected", "reviewed", "funded")
_OBJECTS = ("a budget plan", "the final match", "an interest rate cut", "a vaccine trial", "the software update",
            "a concert tour", "new tariffs", "the stadium deal", "a climate study", "the election results")
_PLACES = ("in Lisbon", "in Oslo", "downtown", "near the harbour", "at the summit", "overnight", "this week")
_LABELS = ("politics", "sports", "finance", "science", "culture")


def write_rows(path: Path, rows: int, seed: int = 0) -> Path:
    """`rows` short labelled sentences, all distinct (a report number), as a CSV."""
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for number in range(rows):
            text = (f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                    f"{rng.choice(_PLACES)}, report {number}.")
            writer.writerow([text, rng.choice(_LABELS)])
    return path


def _preload_transformers() -> None:
    """Imported before any clock starts, so no variant is charged for importing it."""
    import transformers  # noqa: F401


def one_process(args: dict[str, Any]) -> dict[str, Any]:
    """The core functions in a loop: what `single` does before training, without Prefect."""
    _preload_transformers()
    timed = bench.Stopwatch()
    bench.prepare_pipeline(args["params"], timed)
    prepare, tokenize = timed.timings["prepare"], timed.timings["tokenize"]
    return {"read": prepare, "tokenize": tokenize, "total": prepare + tokenize}


def dask(args: dict[str, Any]) -> dict[str, Any]:
    """The flow's own stages: the prepare task, then the tokenisation subflow on its Dask runner
    (with `processes`, a local cluster of worker processes whatever the data's size)."""
    _preload_transformers()
    from prefect import flow

    import tasks.data
    from loraflow.config import SingleParams
    from loraflow.pipeline import DATA_STAGES, PipelineRun, stages_through
    from loraflow.plan import plan_run
    from orchestration.stages import StageRecorder, result_storage
    from tasks.stage_tasks import run_stages

    if args["processes"]:
        tasks.data.PROCESS_CLUSTER_MIN_BYTES = 0

    params = SingleParams.model_validate(args["params"])
    plan = plan_run(params)

    @flow(name="benchmark-preprocess")
    def preprocess() -> dict[str, float]:
        stages = StageRecorder(result_storage(params))
        run_stages(stages_through(DATA_STAGES, "tokenize"), PipelineRun(plan), stages)
        return stages.timings

    started = time.perf_counter()
    timings = preprocess()
    return {"read": timings["prepare"], "tokenize": timings["tokenize"], "total": time.perf_counter() - started}


def datasets_map(args: dict[str, Any]) -> dict[str, Any]:
    """What a Hugging Face user writes: load the CSV, map the tokenizer over it in two processes."""
    _preload_transformers()
    import datasets
    from transformers import AutoTokenizer

    from loraflow.models import resolve_model
    from loraflow.settings import resolve_training_settings

    datasets.disable_progress_bars()
    max_length = resolve_training_settings("classification-small", {}, TASK).max_length
    started = time.perf_counter()
    table = datasets.Dataset.from_csv(args["params"]["dataset"]["path"], cache_dir=str(Path(args["out"]) / "hf-cache"))
    loaded_at = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    table.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True, num_proc=2, remove_columns=["text"],
    )
    finished = time.perf_counter()
    return {"read": loaded_at - started, "tokenize": finished - loaded_at, "total": finished - started}


def main(argv: Sequence[str] | None = None) -> bench.Report:
    parser = bench.argument_parser(__doc__, repeat=3)
    parser.add_argument("--sizes", default=None, help=f"rows, comma-separated (default {','.join(map(str, SIZES))})")
    parser.add_argument("--shard-size", type=int, default=None, help="rows per tokenisation shard (default: the flow's)")
    args = bench.parse_arguments(parser, argv)
    sizes = [int(size) for size in args.sizes.split(",")] if args.sizes else list(SMOKE_SIZES if args.smoke else SIZES)
    from loraflow.config import SingleParams

    shard_size = args.shard_size or SingleParams.model_fields["shard_size"].default
    report = bench.Report("Preprocessing scale", TARGET, __file__, argv)
    results: dict[int, dict[str, list[bench.Measurement]]] = {}
    with bench.session(args) as session:
        workloads = {"one process": "one-process", ONE_THREAD: "one-process", "dask": "dask",
                     "dask, processes": "dask", "datasets.map": "datasets"}

        def run(name: str, data: Path) -> bench.Measurement:
            out = next(session.outputs)
            params = {"dataset": {"path": str(data)}, "output_dir": str(out), "shard_size": shard_size}
            child_args = {"params": params, "out": str(out), "processes": name == "dask, processes"}
            env = {**session.env, "TOKENIZERS_PARALLELISM": "false"} if name == ONE_THREAD else session.env
            measurement = bench.run_child(__file__, workloads[name], child_args, env)
            _remove(out)
            return measurement

        for size in sizes:
            data = write_rows(session.work / f"rows-{size}.csv", size)
            print(f"{size} rows:")
            variants = VARIANTS if HAS_DATASETS else VARIANTS[:-1]
            results[size] = bench.interleaved({name: partial(run, name, data) for name in variants}, args.repeat)
            data.unlink()
    _tables(report, results, shard_size)
    if args.smoke:
        report.note("smoke run: a few hundred rows; the ratios say nothing about the targets")
    return bench.finish(report, args)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _tables(report: bench.Report, results: dict[int, dict[str, list[bench.Measurement]]], shard_size: int) -> None:
    def seconds(runs: list[bench.Measurement], key: str = "total") -> float:
        return bench.median([run.result[key] for run in runs])

    rows = []
    for size, by_variant in results.items():
        reference = seconds(by_variant["one process"])
        one_thread = seconds(by_variant[ONE_THREAD])
        versus_map = seconds(by_variant["datasets.map"]) if "datasets.map" in by_variant else None
        for name, runs in by_variant.items():
            total = seconds(runs)
            rows.append([
                f"{size:,}", name, f"{total:.2f}", f"{size / total:,.0f}", f"{reference / total:.2f}x",
                f"{one_thread / total:.2f}x",
                bench.ratio(total, versus_map) if versus_map else "-",
                f"{total / size * 1e6:.1f}", f"{seconds(runs, 'read'):.2f}", f"{seconds(runs, 'tokenize'):.2f}",
                f"{bench.median([run.cpu_s for run in runs]):.1f}", f"{bench.median([run.peak_mb for run in runs]):.0f}", len(runs),
            ])
    report.table(
        f"Read + tokenise, medians of rounds (shard_size {shard_size}; speed-up = one process time / this time, "
        "vs 1 thread = the same against the one-thread process; CPU s: the whole process tree, imports included):",
        ["rows", "variant", "s", "rows/s", "speed-up", "vs 1 thread", "time vs map", "us/row", "prepare/load s", "tokenize s", "CPU s", "peak MB", "runs"],
        rows,
    )
    if not HAS_DATASETS:
        report.note("datasets is not installed (`pip install -e '.[bench]'`): no datasets.map comparison")


if __name__ == "__main__":
    bench.main_guard(main, {"one-process": one_process, "dask": dask, "datasets": datasets_map})
