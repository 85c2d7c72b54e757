"""Server database: the same burst of deployment runs on a Prefect server on SQLite and on PostgreSQL.

    .venv/bin/python benchmarks/server_database.py            # 2 rounds of 8 `single` runs created at once
    .venv/bin/python benchmarks/server_database.py --smoke    # 2 runs of a few rows, one round

Each variant is a whole stack started fresh for its round, as `tests/production_stack.py` starts
it: `prefect server start` on SQLite (its default) or on a new PostgreSQL database, the set-up,
two CPU workers and a GPU worker with two slots. The burst is N `single` runs of small datasets
created together through the REST API, each training as a `train/gpu` flow run. Reported per
variant: trainings per minute (first creation to last end), p50/p95 seconds from a run's creation
to its training's start, and the server's and workers' peak memory. PostgreSQL needs
`LORAFLOW_TEST_POSTGRES` (default postgresql://postgres@127.0.0.1:5432, trust auth).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/<file>.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bench

DATABASES = ("sqlite", "postgresql")
TARGET = "PostgreSQL at least SQLite's runs per minute, with no run lost to 'database is locked'"


def burst(database: str, work: Path, runs: int, args) -> bench.Measurement:
    """One stack on `database`, `runs` pipelines created at once, waited for; its figures."""
    from tests.production_stack import create_run, load_figures, production_stack, wait_finished
    from tests.test_flow_single import write_messy_csv
    from tests.tiny_models import easy_classification_examples

    root = work / f"{database}-{time.monotonic_ns()}"
    root.mkdir(parents=True)
    with production_stack(root, database) as stack:
        api, ids = stack["api"], []
        started = time.monotonic()
        for number in range(runs):
            data = write_messy_csv(root / f"d{number}.csv", easy_classification_examples(36, seed=number))
            params = {**bench.single_params(root / "runs", args), "dataset": {"path": str(data)}}
            ids.append(create_run(api, "single/loraflow", params))
        ended = wait_finished(api, ids, timeout=1800)
        wall = time.monotonic() - started
        figures = load_figures(api, ids, wall, stack["processes"])
        lost = [run["name"] for run in ended.values() if run["state_type"] != "COMPLETED"]
        if lost:
            raise bench.BenchmarkError(f"{database}: runs did not complete: {lost}")
    peaks, cpu = figures["peak_rss_mib"], figures["cpu_s"]
    return bench.Measurement(seconds=wall, peak_mb=sum(peaks.values()), cpu_s=sum(cpu.values()),
                             result={**figures["creation_to_training_start_s"], "rpm": figures["runs_per_minute"],
                                     "server_mb": peaks.get("server", 0)})


def _median(key: str, runs: list[bench.Measurement]) -> str:
    return f"{bench.median([run.result[key] for run in runs]):g}"


def main(argv: Sequence[str] | None = None) -> bench.Report:
    args = bench.parse_arguments(bench.argument_parser(__doc__, repeat=2), argv)
    report = bench.Report("Server database", TARGET, __file__, argv)
    if not args.smoke:
        args.overrides = {"num_epochs": 1, "max_length": 32, **args.overrides}
    runs = 2 if args.smoke else 8
    with bench.work_dir(args.work_dir) as work:
        measured = bench.interleaved({name: partial(burst, name, work, runs, args) for name in DATABASES}, args.repeat)
    extra = {"runs/min": partial(_median, "rpm"), "p50 to training s": partial(_median, "p50"),
             "p95 to training s": partial(_median, "p95"), "server MB": partial(_median, "server_mb")}
    report.table(f"A burst of {runs} `single` runs created at once; whole stack (server + 3 workers), medians of rounds "
                 "(ratios to SQLite; peak MB = server and workers, each at its own peak):",
                 *bench.comparison(measured, "sqlite", extra))
    if args.api_url:
        report.note("--api-url is not used: each variant starts its own server on its own database")
    if args.smoke:
        report.note("smoke run: a few rows and steps; the ratios say nothing about the target")
    return bench.finish(report, args)


if __name__ == "__main__":
    bench.main_guard(main, {})
