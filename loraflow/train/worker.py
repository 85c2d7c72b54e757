"""One rank of a training run: `torchrun ... -m loraflow.train.worker <job.json>`.

Started by `loraflow.train.launch`, never by hand. Each rank trains with the transformers
Trainer, which runs DDP under torchrun unchanged. Rank 0 speaks for the run: its log lines
and progress go to stdout as `LORAFLOW-EVENT {json}` lines that the launcher forwards to the
run's logs, and it writes the result file. Every rank that fails writes what went wrong to
`errors/rank-N.json`, so the launcher can tell a bad input from a crash from out-of-memory.

The rank stops at a checkpoint when the stop file appears (a cancelled run), on SIGTERM (its
torchrun agent was told to end), or when the launching process is gone: a training never
outlives the run that started it.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from pydantic import BaseModel, Field

from loraflow.layout import atomic_write_json
from loraflow.train.request import TrainRequest

EVENT_PREFIX = "LORAFLOW-EVENT "
HEARTBEAT_SECONDS = 2.0
_PR_SET_PDEATHSIG = 1


class WorkerJob(BaseModel):
    """Everything a rank needs, written by the launcher next to the run's checkpoints."""

    request: TrainRequest
    stop_file: str
    result_file: str
    errors_dir: str
    pids_dir: str
    launcher_pid: int
    callbacks: list[str] = Field(
        default_factory=list, description="Extra Trainer callbacks as `module:Class`, built in every rank."
    )


def emit(kind: str, value) -> None:
    print(EVENT_PREFIX + json.dumps({"kind": kind, "value": value}), flush=True)


def process_alive(pid: int) -> bool:
    """Whether a process of this host still runs (someone else's counts: it refuses the signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopRequests:
    """`should_stop` for the trainer: a stop file, SIGTERM, or the launcher's death."""

    def __init__(self, job: WorkerJob):
        self.stop_file, self.launcher_pid, self.signalled = Path(job.stop_file), job.launcher_pid, False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True

    def __call__(self) -> bool:
        return self.signalled or self.stop_file.exists() or not process_alive(self.launcher_pid)


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the torchrun agent dies: a rank it can no longer stop stops itself."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the launcher check in StopRequests still applies
        pass


def _callbacks(specs: list[str]) -> tuple:
    built = []
    for spec in specs:
        module, _, name = spec.partition(":")
        built.append(getattr(importlib.import_module(module), name)())
    return tuple(built)


def _heartbeat():
    """A Trainer callback that tells the launcher, every few seconds of steps, that training moves."""
    from transformers import TrainerCallback

    class Heartbeat(TrainerCallback):
        last = 0.0

        def on_train_begin(self, args, state, control, **kwargs):  # the model is loaded: the hang clock restarts
            if state.is_world_process_zero:
                emit("heartbeat", state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero and time.monotonic() - self.last >= HEARTBEAT_SECONDS:
                self.last = time.monotonic()
                emit("heartbeat", state.global_step)

    return Heartbeat()


def _write_error(job: WorkerJob, rank: int, error: BaseException) -> None:
    atomic_write_json(
        Path(job.errors_dir) / f"rank-{rank}.json",
        {"type": type(error).__name__, "message": str(error).splitlines()[0] if str(error) else type(error).__name__,
         "traceback": traceback.format_exc()[-4000:]},
    )


def main(argv: list[str]) -> int:
    job = WorkerJob.model_validate_json(Path(argv[0]).read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0"))
    _die_with_parent()
    Path(job.pids_dir, f"rank-{rank}.pid").write_text(str(os.getpid()), encoding="utf-8")
    stop = StopRequests(job)
    speak = rank == 0
    if speak:
        emit("heartbeat", 0)  # started: the hang clock counts the imports and the model load from here
    try:
        import torch

        if os.environ.get("LORAFLOW_TORCH_THREADS"):
            torch.set_num_threads(int(os.environ["LORAFLOW_TORCH_THREADS"]))
        from loraflow.train.trainer import train_adapter

        result = train_adapter(
            job.request,
            on_progress=(lambda update: emit("progress", update.model_dump())) if speak else None,
            log=(lambda message: emit("log", message)) if speak else (lambda message: None),
            should_stop=stop,
            callbacks=(_heartbeat(), *_callbacks(job.callbacks)),
            checkpoints_prepared=True,
            back_off_out_of_memory=False,
        )
    except BaseException as error:  # noqa: BLE001 - every failure is reported to the launcher, then re-raised
        _write_error(job, rank, error)
        raise
    if speak:
        atomic_write_json(job.result_file, result.model_dump())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
