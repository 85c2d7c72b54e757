"""Orchestration overhead: the `single` flow against the same pipeline as a plain script.

    .venv/bin/python benchmarks/orchestration_overhead.py            # 3 rounds of the MiniLM demo
    .venv/bin/python benchmarks/orchestration_overhead.py --smoke    # a few rows and steps

The plain script walks the same stage lists (`loraflow.pipeline`: prepare, tokenise, baseline,
train, evaluate, samples, register) with the same parameters, calling each stage's core function,
and no Prefect. The
flow runs as a user runs it, `python flows/single.py params.json`: against a running Prefect
server, and with Prefect's temporary local server. Every run writes to a fresh output folder,
so nothing is served from cache. What Prefect costs is the difference in wall time; the
per-stage table shows where it goes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/<file>.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bench
from loraflow.pipeline import DATA_STAGES, TRAINING_STAGES

STAGE_NAMES = [stage.name for stage in (*DATA_STAGES, *TRAINING_STAGES)]

TARGET = "flow with a running server at most 1.10x the plain script, for a training job of about a minute"


def plain_pipeline(args: dict[str, Any]) -> dict[str, Any]:
    """The `single` flow's work without Prefect: the same stage lists, each stage's core function called in turn."""
    from loraflow.pipeline import run_plain
    from loraflow.registry import PROMOTED_ALIAS

    timed = bench.Stopwatch()
    run_plain([*DATA_STAGES, *TRAINING_STAGES], bench.plain_run(args["params"], PROMOTED_ALIAS), timed)
    return {"timings": timed.timings}


def _outside_stages(run: bench.Measurement) -> float:
    return run.seconds - sum(run.result["timings"].values())


def _apart_from_training(run: bench.Measurement) -> float:
    return run.seconds - run.result["timings"]["train"]


def _note_orchestration_cost(report: bench.Report, runs: dict[str, list[bench.Measurement]]) -> None:
    """The flow's extra seconds apart from training, against the plain run of the same round.

    Training is the same code in both and takes most of the time, so on a busy machine its
    swings drown the orchestration cost in the wall-time ratio; this figure leaves them out."""
    plain = runs["plain"]
    for name, measured in runs.items():
        if name == "plain":
            continue
        extra = bench.median([_apart_from_training(f) - _apart_from_training(p) for f, p in zip(measured, plain)])
        wall = bench.median([run.seconds for run in plain])
        report.note(f"{name}: {extra:+.1f} s per run apart from training (median of rounds), i.e. "
                    f"{(wall + extra) / wall:.2f}x the plain run's median {wall:.1f} s")


def main(argv: Sequence[str] | None = None) -> bench.Report:
    args = bench.parse_arguments(bench.argument_parser(__doc__, repeat=3, modes=True), argv)
    report = bench.Report("Orchestration overhead", TARGET, __file__, argv)
    with bench.session(args) as session:

        def plain() -> bench.Measurement:
            return bench.run_child(__file__, "plain", {"params": bench.single_params(next(session.outputs), args)}, session.envs["temporary"])

        def flow(mode: str) -> bench.Measurement:
            output = next(session.outputs)
            return bench.run_single_flow(bench.single_params(output, args), output / "params.json", session.envs[mode])

        variants = {"plain": plain, **{f"flow, {bench.MODES[mode]}": partial(flow, mode) for mode in args.modes}}
        runs = bench.interleaved(variants, args.repeat)
    report.table("Per run, process start to exit, medians of rounds (ratios to plain):", *bench.comparison(runs, "plain"))
    report.table(
        "Where the time goes (median seconds per stage; outside = imports, server, flow and task bookkeeping):",
        ["stage", *runs],
        [[stage, *(f"{bench.median([r.result['timings'].get(stage, 0.0) for r in rs]):.2f}" for rs in runs.values())]
         for stage in STAGE_NAMES]
        + [["outside stages", *(f"{bench.median([_outside_stages(r) for r in rs]):.2f}" for rs in runs.values())]],
    )
    _note_orchestration_cost(report, runs)
    if args.smoke:
        report.note("smoke run: a few rows and steps; the ratios say nothing about the target")
    return bench.finish(report, args)


if __name__ == "__main__":
    bench.main_guard(main, {"plain": plain_pipeline})
