"""Cached re-run: a second identical `single` run against the first.

    .venv/bin/python benchmarks/cached_rerun.py            # 3 rounds of the MiniLM demo
    .venv/bin/python benchmarks/cached_rerun.py --smoke    # a few rows and steps

Each round runs `python flows/single.py params.json` twice with the same parameters and the
same output folder: the first run computes every stage, the second should be served from the
cache in `<output_dir>/.loraflow-cache`. Both with a running Prefect server and with the
temporary local server; with the latter, every run pays for starting that server, which
dominates a cached run's wall time.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/<file>.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bench

TARGET = "the second run takes at most 10% of the first run's time"


def main(argv: Sequence[str] | None = None) -> bench.Report:
    args = bench.parse_arguments(bench.argument_parser(__doc__, repeat=3, modes=True), argv)
    report = bench.Report("Cached re-run", TARGET, __file__, argv)
    with bench.session(args) as session:

        def first_and_second(mode: str) -> bench.Measurement:
            output = next(session.outputs)
            params = bench.single_params(output, args)
            first, second = (bench.run_single_flow(params, output / "params.json", session.envs[mode]) for _ in range(2))
            return bench.Measurement(
                seconds=second.seconds, peak_mb=second.peak_mb, cpu_s=second.cpu_s,
                result={"first": first.seconds, "first_cpu": first.cpu_s,
                        "first_stages": sum(first.result["timings"].values()),
                        "second_stages": sum(second.result["timings"].values()),
                        "cached": len(second.result["cached_stages"]), "stages": len(second.result["cached"])},
            )

        runs = bench.interleaved({bench.MODES[mode]: partial(first_and_second, mode) for mode in args.modes}, args.repeat)
    rows = []
    for name, pairs in runs.items():
        def med(value) -> float:
            return bench.median([value(run) for run in pairs])

        rows.append([
            name, f"{med(lambda r: r.result['first']):.1f}", f"{med(lambda r: r.seconds):.1f}",
            f"{med(lambda r: r.seconds / r.result['first']):.1%}", f"{med(lambda r: r.cpu_s / r.result['first_cpu']):.1%}",
            f"{med(lambda r: r.result['first_stages']):.1f}", f"{med(lambda r: r.result['second_stages']):.2f}",
            f"{min(r.result['cached'] for r in pairs)}/{pairs[0].result['stages']}", len(pairs),
        ])
    report.table(
        "Each run from process start to exit, and the time inside the pipeline's stages; medians of rounds:",
        ["mode", "first s", "second s", "second/first", "CPU second/first", "first: in stages s",
         "second: in stages s", "stages cached", "rounds"],
        rows,
    )
    if "temporary" in args.modes:
        report.note("with the temporary server every run first starts a Prefect server (8-16 s on 2 cores): it, "
                    "not the pipeline, dominates the cached run")
    if args.smoke:
        report.note("smoke run: a few rows and steps; the ratios say nothing about the target")
    return bench.finish(report, args)


if __name__ == "__main__":
    bench.main_guard(main, {})
