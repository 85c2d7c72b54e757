"""Variations sharing: a 2x2 grid in one `variations` run against four separate `single` runs.

    .venv/bin/python benchmarks/variations_sharing.py            # 2 rounds of the variations demo grid
    .venv/bin/python benchmarks/variations_sharing.py --smoke    # a 2-point grid, a few rows and steps

The grid is the variations demo's: learning rate x LoRA rank on the topics data, two epochs
each. `variations` should prepare and tokenise the dataset (and evaluate the base model)
once, then train and evaluate each point; separate `single` runs, each in its own output
folder, repeat all of it per run. Both run from the command line against a running Prefect
server, which counts the work actually done: task runs of `prepare-dataset` and
`tokenize-shard` that completed during each variant (cache hits are `Cached`, not counted).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/<file>.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bench

GRID = {"learning_rate": [0.001, 0.003], "lora.r": [4, 8]}
OVERRIDES = {"num_epochs": 2}
COUNTED_TASKS = ("prepare-dataset", "tokenize-shard")
TARGET = "the grid prepares and tokenises the dataset once; separate runs do it once per run"


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _median_count(task: str, runs: list[bench.Measurement]) -> str:
    return f"{bench.median([run.result[task] for run in runs]):g}"


def main(argv: Sequence[str] | None = None) -> bench.Report:
    args = bench.parse_arguments(bench.argument_parser(__doc__, repeat=2), argv)
    grid = {"learning_rate": GRID["learning_rate"]} if args.smoke else GRID
    overrides = {**OVERRIDES, **bench.single_params(Path(), args)["overrides"]}  # smoke's and --overrides on top
    points = grid_points(grid)
    report = bench.Report("Variations sharing", TARGET, __file__, argv)
    with bench.session(args) as session:

        def counting(run: Callable[[], bench.Measurement]) -> bench.Measurement:
            """The run, with the task runs it completed (not cached), counted on the server."""
            before = {name: bench.count_task_runs(session.api_url, name, "Completed") for name in COUNTED_TASKS}
            measurement = run()
            measurement.result = {name: bench.count_task_runs(session.api_url, name, "Completed") - before[name] for name in COUNTED_TASKS}
            return measurement

        def separate_runs() -> bench.Measurement:
            runs = []
            for point in points:
                output = next(session.outputs)
                params = {**bench.single_params(output, args), "overrides": {**overrides, **point}}
                runs.append(bench.run_single_flow(params, output / "params.json", session.env))
            return bench.Measurement(seconds=sum(r.seconds for r in runs), peak_mb=max(r.peak_mb for r in runs),
                               cpu_s=sum(r.cpu_s for r in runs))

        def one_grid() -> bench.Measurement:
            output = next(session.outputs)
            params = {**bench.single_params(output, args), "overrides": overrides, "grid": grid}
            return bench.run_flow(bench.VARIATIONS_FLOW, params, output / "params.json", session.env)

        names = (f"{len(points)} single runs", f"variations, {len(points)}-point grid")
        runs = bench.interleaved({names[0]: partial(counting, separate_runs), names[1]: partial(counting, one_grid)}, args.repeat)
    counts = {f"{task} runs": partial(_median_count, task) for task in COUNTED_TASKS}
    report.table(
        f"Grid {grid} over overrides {overrides}; medians of rounds; task runs that completed (not cached):",
        *bench.comparison(runs, names[0], counts),
    )
    if args.smoke:
        report.note("smoke run: a 2-point grid of a few rows and steps; the times say nothing")
    return bench.finish(report, args)


if __name__ == "__main__":
    bench.main_guard(main, {})
