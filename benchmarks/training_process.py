"""Training in its own torchrun process tree: what the launch costs, what DDP gives on the CPU,
and how much faster a grid trains with two device slots.

    .venv/bin/python benchmarks/training_process.py            # 3 rounds; the grid part 2 rounds
    .venv/bin/python benchmarks/training_process.py --smoke    # a few rows and steps

- Launch cost: one demo-sized training, in a fresh process each round, either called in that
  process (`train_adapter`, what the flows did before) or started through `run_training`
  (one device: the rank alone, without torchrun's agent; the same request). The difference of the
  wall times is what starting the training process costs; both import torch, transformers and peft once.
- DDP: the same training on `devices: 2` (two gloo processes, half the per-device batch) against
  `devices: 1` (the whole batch), with two CPU slots so each process has one core: samples/s
  and the largest relative difference of the logged losses, step by step.
- Parallel grid: `python flows/variations.py` on a 4-point grid with `LORAFLOW_CPU_DEVICES=2`
  against `1`, every training process on one torch thread in both (OMP_NUM_THREADS=1): wall ratio.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/<file>.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bench

TARGET = ("starting the process tree adds at most 2 s; a 4-point grid on 2 device slots takes at most 0.6x "
          "the wall time of 1 slot; DDP on 2 CPU processes reported with its loss match")


def _request(args: dict[str, Any], out: Path):
    from loraflow.train.request import TrainRequest

    request = TrainRequest.model_validate(args["request"])
    update = {"checkpoint_dir": str(out / "checkpoints"), "adapter_dir": str(out / "model"), "logs_dir": str(out / "logs")}
    if "batch_size" in args:
        update["settings"] = request.settings.model_copy(update={"batch_size": args["batch_size"]})
    return request.model_copy(update=update)


def inline_training(args: dict[str, Any]) -> dict[str, Any]:
    """The training called in this process, as the flows did before the process tree."""
    from loraflow.train.trainer import train_adapter

    result = train_adapter(_request(args, Path(args["out"])), log=lambda line: None)
    return {"samples_per_second": result.samples_per_second, "runtime": result.train_runtime_s}


def process_training(args: dict[str, Any]) -> dict[str, Any]:
    """The same training through `run_training` on `devices` leased devices."""
    from loraflow.devices import lease_devices
    from loraflow.train.launch import run_training

    request = _request(args, Path(args["out"]))
    with lease_devices(args.get("devices", 1), "benchmark") as lease:
        result = run_training(request, lease, log=lambda line: None)
    lines = (Path(request.logs_dir) / "metrics.jsonl").read_text().splitlines()
    losses = {str(r["step"]): r["loss"] for r in map(json.loads, lines) if "loss" in r}
    return {"samples_per_second": result.samples_per_second, "runtime": result.train_runtime_s, "losses": losses}


def _loss_gap(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[step] - b[step]) / abs(b[step]) for step in b)


def main(argv: Sequence[str] | None = None) -> bench.Report:
    args = bench.parse_arguments(bench.argument_parser(__doc__, repeat=3), argv)
    report = bench.Report("Training process", TARGET, __file__, argv)
    with bench.session(args) as session:
        data = bench.prepare_pipeline(bench.single_params(session.work / "data", args))
        request = data.request.model_dump(mode="json")
        one_core = {**session.env, "OMP_NUM_THREADS": "1"}

        def child(name: str, env: dict[str, str], **extra: Any):
            return lambda: bench.run_child(__file__, name, {"request": request, "out": str(next(session.outputs)),
                                                            **extra}, env)

        launch = bench.interleaved({"in the flow process": child("inline", session.env),
                                    "own process (one device: no torchrun agent)": child("process", session.env)}, args.repeat)
        inline_s = bench.median([run.seconds for run in launch["in the flow process"]])
        process_s = bench.median([run.seconds for run in launch["own process (one device: no torchrun agent)"]])
        report.table(f"Launch cost, {data.config.total_steps} steps of the demo training, medians of rounds:",
                     ["variant", "wall s", "train s", "peak MB", "runs"],
                     [[name, f"{bench.median([r.seconds for r in runs]):.1f}",
                       f"{bench.median([r.result['runtime'] for r in runs]):.1f}",
                       f"{bench.median([r.peak_mb for r in runs]):.0f}", len(runs)] for name, runs in launch.items()])
        report.note(f"starting the process tree: {process_s - inline_s:+.1f} s per training (target at most +2 s)")

        whole = data.config.settings.batch_size
        two_slots = {**one_core, "LORAFLOW_CPU_DEVICES": "2"}
        ddp = bench.interleaved({"devices: 1": child("process", two_slots, devices=1, batch_size=whole),
                                 "devices: 2": child("process", two_slots, devices=2, batch_size=max(1, whole // 2))},
                                args.repeat)
        reference = bench.median([run.result["samples_per_second"] for run in ddp["devices: 1"]])
        gap = max(_loss_gap(b.result["losses"], a.result["losses"]) for a, b in zip(ddp["devices: 1"], ddp["devices: 2"]))
        report.table(f"DDP on the CPU, one core per process, effective batch {whole}, medians of rounds:",
                     ["variant", "samples/s", "vs 1 device", "train s", "runs"],
                     [[name, f"{bench.median([r.result['samples_per_second'] for r in runs]):.1f}",
                       bench.ratio(bench.median([r.result["samples_per_second"] for r in runs]), reference),
                       f"{bench.median([r.result['runtime'] for r in runs]):.1f}", len(runs)]
                      for name, runs in ddp.items()])
        report.note(f"largest relative difference of a logged step loss, devices 2 against 1: {gap:.2e}")

        grid = {"learning_rate": [0.001, 0.003], **({} if args.smoke else {"lora.r": [4, 8]})}

        def grid_run(slots: str):
            def run() -> bench.Measurement:
                out = next(session.outputs)
                params = bench.single_params(out, args, grid=grid, gpu_concurrency_limit=f"bench-grid-{out.name}")
                env = {**one_core, "LORAFLOW_CPU_DEVICES": slots, "LORAFLOW_DEVICE_LOCKS": str(out / "locks")}
                return bench.run_flow(bench.VARIATIONS_FLOW, params, out / "params.json", env)
            return run

        grids = bench.interleaved({"1 device slot": grid_run("1"), "2 device slots": grid_run("2")},
                                  max(1, args.repeat - 1))
    report.table(f"Parallel grid, `python flows/variations.py`, {2 if args.smoke else 4} variants, running server, "
                 "medians of rounds:",
                 *bench.comparison(grids, "1 device slot"))
    if args.smoke:
        report.note("smoke run: a few rows and steps; the ratios say nothing about the target")
    return bench.finish(report, args)


if __name__ == "__main__":
    bench.main_guard(main, {"inline": inline_training, "process": process_training})
