"""Run a training as its own process tree, started with torchrun, watched, and never left behind.

    python -m torch.distributed.run --nproc-per-node=N --standalone -m loraflow.train.worker job.json
    python -m loraflow.train.worker job.json                     # one device on one node

`run_training` writes the job (the `TrainRequest` plus where to put results), starts torchrun
on the devices of a `DeviceLease` (the child sees only those), forwards rank 0's progress and
log lines, and turns the way the child ended into one clear outcome:

- a stop request (a cancelled run, Ctrl-C, `request_stop_all`): the ranks save a checkpoint and
  stop; after `stop_grace_s` every process of the tree is ended; `TrainingStopped`;
- out of memory in any rank: started again from the last checkpoint with half the per-device
  batch and twice the accumulation (the effective batch stays), down to 1;
- a child killed from outside (SIGKILL, the OOM killer) or hung (no step for `hang_timeout_s`):
  `TrainingProcessDied`, naming the signal and the last complete checkpoint; a retry resumes;
- a bad input found in the child: the same `LoraflowError` the child raised.

torchrun starts each rank in a session of its own, so there is no one process group to end:
the ranks record their pids and are ended one by one (each only if it is still this job's
rank). Both torchrun and the ranks ask the kernel for SIGTERM when their parent dies, and the
ranks also watch the launching process, so a SIGKILLed flow process leaves no training behind.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from loraflow import errors
from loraflow.devices import DeviceLease
from loraflow.errors import ConfigError, TrainingStopped
from loraflow.layout import atomic_write_json
from loraflow.train.checkpoints import find_resumable_checkpoint, prepare_checkpoints
from loraflow.train.request import ProgressUpdate, TrainRequest, TrainResult, smaller_batch
from loraflow.train.worker import EVENT_PREFIX, WorkerJob

STOP_CHECK_SECONDS = 1.0
OUTPUT_TAIL_LINES = 40
# Ask the kernel for SIGTERM when the launching thread dies (prctl PR_SET_PDEATHSIG survives exec),
# then become torchrun. If the launcher died before the request took hold, stop at once.
_ORPHAN_GUARD = (
    "import ctypes, os, sys\n"
    "try:\n    ctypes.CDLL(None).prctl(1, 15)\n"
    "except (OSError, AttributeError):\n    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n    sys.exit(1)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


class TrainingProcessDied(ChildProcessError):
    """The training process tree ended without finishing: killed from outside, or hung. An
    `OSError`, so the task's retry policy treats it as transient: the retry resumes from the
    last complete checkpoint."""


class TrainingProcessFailed(RuntimeError):
    """A rank raised an error that is neither bad input nor out-of-memory (a bug, a library error)."""


class LaunchOptions(BaseModel):
    """How the training process tree is started and watched."""

    nnodes: int = Field(default=1, ge=1, description="Machines the run spans; torchrun's --nnodes.")
    rdzv_endpoint: str | None = Field(default=None, description="host:port of the rendezvous (nnodes > 1).")
    rdzv_id: str | None = Field(default=None, description="One id shared by every node of the run.")
    hang_timeout_s: float = Field(default=1800, gt=0, description="End a training with no step for this long.")
    stop_grace_s: float = Field(default=60, gt=0, description="Time to save a checkpoint after a stop request.")
    callbacks: list[str] = Field(default_factory=list, description="Extra Trainer callbacks, `module:Class`.")

    def with_rendezvous(self, run_id: str | None = None) -> "LaunchOptions":
        """Multi-node rendezvous from the environment of the process that launches (the training
        job's job variables `env`): `LORAFLOW_RDZV_ENDPOINT` (the first node's host:port) and
        `LORAFLOW_RDZV_ID` (else the run's id). Nothing to add for one node."""
        if self.nnodes == 1:
            return self
        endpoint = self.rdzv_endpoint or os.environ.get("LORAFLOW_RDZV_ENDPOINT")
        if not endpoint:
            raise ConfigError(
                f"nnodes: {self.nnodes} nodes need LORAFLOW_RDZV_ENDPOINT (host:port of the first node) in the "
                "environment that launches the training: this shell's for a run on this host, or a deployment's "
                "training_job_variables: {env: {LORAFLOW_RDZV_ENDPOINT: 'train-0.train:29400'}}"
            )
        rdzv_id = self.rdzv_id or os.environ.get("LORAFLOW_RDZV_ID") or run_id or "loraflow"
        return self.model_copy(update={"rdzv_endpoint": endpoint, "rdzv_id": rdzv_id})


def torchrun_command(job_file: str | Path, nproc_per_node: int, options: LaunchOptions,
                     launcher_pid: int | None = None, python: str = sys.executable) -> list[str]:
    """The child's command line: the orphan guard, then torchrun with one rank per device.

    A one-device training on one node is the one rank alone, started without the torchrun agent:
    the agent would import torch a second time and run a rendezvous for a world of one (2-3 s per
    training on a 2-core machine), and the rank would wrap its model in a DDP of one process."""
    guard = [python, "-c", _ORPHAN_GUARD, str(launcher_pid or os.getpid())]
    if nproc_per_node == 1 and options.nnodes == 1:
        return [*guard, "-m", "loraflow.train.worker", str(job_file)]
    if options.nnodes == 1:
        rendezvous = ["--standalone"]
    else:
        rendezvous = [f"--nnodes={options.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={options.rdzv_endpoint}",
                      f"--rdzv-id={options.rdzv_id}"]
    return [
        *guard, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", *rendezvous, "--max-restarts=0",
        "-m", "loraflow.train.worker", str(job_file),
    ]


# Every training process tree this process runs, so that one Ctrl-C can stop them all.
_RUNNING: set["_ProcessTree"] = set()
_STOP_EVERYTHING = threading.Event()


def request_stop_all() -> None:
    """Ask every training this process runs, and any it starts from now on, to checkpoint and stop."""
    _STOP_EVERYTHING.set()
    for tree in list(_RUNNING):
        tree.request_stop()


def end_all_trainings() -> None:
    """End every process of every training this process runs, now: for a run that quits at once (a
    second Ctrl-C). A rank left to stop on its own would go on writing into a folder no longer held."""
    for tree in list(_RUNNING):
        tree.end()


def trainings_running() -> bool:
    """Whether a process of any training this process runs is still alive: once none is, what the
    trainings saved is on disk, even while their launchers still wait on a callback (an API call to
    a server that is gone)."""
    return any(tree.process.poll() is None or tree._ranks() for tree in list(_RUNNING))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class _ProcessTree:
    """The torchrun agent and its ranks, with their output read line by line on a thread."""

    def __init__(self, job_dir: Path, command: list[str], env: dict[str, str], output_log: Path):
        self.job_dir, self.stop_file = job_dir, job_dir / "stop"
        output_log.parent.mkdir(parents=True, exist_ok=True)
        self.output_log = open(output_log, "a", encoding="utf-8")
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the launcher, which stops training itself
        )
        self.reader = threading.Thread(target=self._read, name="training-output", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        """Forward every line. The log file is only a copy: a full disk ends the copy, never the forwarding
        (a reader that died on the write left the launcher waiting for the end of the output for ever)."""
        copying = True
        try:
            for line in self.process.stdout:
                if copying and not line.startswith(EVENT_PREFIX):
                    try:
                        self.output_log.write(line)
                        self.output_log.flush()
                    except OSError as error:
                        copying = False
                        self.lines.put(f"cannot write {self.output_log.name} ({error}); output goes on here only\n")
                self.lines.put(line)
        finally:
            self.lines.put(None)

    def request_stop(self) -> None:
        self.stop_file.touch()

    def _ranks(self) -> list[int]:
        """Pids of this job's ranks that are still running this job (a pid is checked before it is signalled)."""
        pids = []
        for note in (self.job_dir / "pids").glob("rank-*.pid"):
            try:
                pid = int(note.read_text(encoding="utf-8"))
                if str(self.job_dir) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    pids.append(pid)
            except (OSError, ValueError):
                continue
        return pids

    def end(self) -> None:
        """End every process of the tree, now."""
        for pid in [self.process.pid, *self._ranks()]:
            try:
                os.killpg(pid, signal.SIGKILL)  # the agent and each rank lead a process group of their own
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> int:
        self.end()  # a rank that outlived its agent (it should not) goes too
        code = self.process.wait()
        self.reader.join(timeout=5)
        try:
            self.output_log.close()
        except OSError:  # what a full disk kept in its buffer; the lines were forwarded all the same
            pass
        return code


class _Ending(BaseModel):
    code: int
    stop_requested: bool = False
    ended_after_grace: bool = False
    hung: bool = False
    tail: list[str] = []


def _supervise(tree: _ProcessTree, options: LaunchOptions, on_event: Callable[[dict], None],
               should_stop: Callable[[], bool] | None, log: Callable[[str], None]) -> _Ending:
    ending = _Ending(code=0)
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    last_step = last_check = time.monotonic()
    stop_deadline: float | None = None
    try:
        while True:
            try:
                line = tree.lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line.startswith(EVENT_PREFIX):
                last_step = time.monotonic()
                on_event(json.loads(line[len(EVENT_PREFIX):]))
            elif line:
                tail.append(line.rstrip())
            now = time.monotonic()
            if stop_deadline is None and now - last_check >= STOP_CHECK_SECONDS:
                last_check = now
                if _STOP_EVERYTHING.is_set() or (should_stop is not None and should_stop()):
                    log("asking the training to save a checkpoint and stop")
                    tree.request_stop()
                    stop_deadline, ending.stop_requested = now + options.stop_grace_s, True
            if stop_deadline is not None and now > stop_deadline and not ending.ended_after_grace:
                log(f"warning: the training did not stop within {options.stop_grace_s:g}s; ending its processes")
                tree.end()
                ending.ended_after_grace = True
            if now - last_step > options.hang_timeout_s and not ending.hung:
                log(f"warning: the training made no progress for {options.hang_timeout_s:g}s; ending its processes")
                tree.end()
                ending.hung = True
    except BaseException:  # Ctrl-C in this thread, or the flow run going away: stop, give a grace, then end
        tree.request_stop()
        try:
            tree.process.wait(timeout=options.stop_grace_s)
        finally:
            tree.close()
        raise
    ending.code, ending.tail = tree.close(), list(tail)
    return ending


def _checkpoint_text(request: TrainRequest) -> str:
    found = find_resumable_checkpoint(request.checkpoint_dir, log=lambda message: None)
    if found is None:
        return "no complete checkpoint yet, so it starts again from step 0"
    return f"last complete checkpoint: {Path(found).name} in {request.checkpoint_dir}; a retry or the next run resumes from it"


def _exit_signal(ending: _Ending) -> str | None:
    """The signal that ended a rank or the agent: from torchrun's failure report, or the agent's own code."""
    for line in reversed(ending.tail):
        if match := re.search(r"Signal (\d+) \((SIG\w+)\)", line):
            return match.group(2)
        if match := re.search(r"exitcode\s*:\s*-(\d+)", line):
            return signal.Signals(int(match.group(1))).name
    return signal.Signals(-ending.code).name if ending.code < 0 else None


def _rank_errors(job_dir: Path) -> list[dict]:
    """What each failed rank wrote, rank 0 first."""
    found = []
    for path in sorted((job_dir / "errors").glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return found


# How a full disk shows in a rank's error or output: Python's OSError, safetensors' Rust error, torch.save's writer.
_NO_SPACE_SIGNS = ("No space left on device", "StorageFull", "[Errno 28]", "file write failed")


def _out_of_space(ending: _Ending, failures: list[dict], folder: Path) -> bool:
    """Whether the training failed for a full disk: a rank said so, or the run folder has under 1 MiB
    left (a rank that cannot write its error report leaves only that to go by)."""
    said = "\n".join([*ending.tail, *(f"{f.get('message', '')}\n{f.get('traceback', '')}" for f in failures)])
    try:
        nearly_full = shutil.disk_usage(folder).free < 2**20
    except OSError:
        nearly_full = False
    return nearly_full or any(sign in said for sign in _NO_SPACE_SIGNS)


def _raise_for(ending: _Ending, failures: list[dict], request: TrainRequest, log: Callable[[str], None]) -> None:
    stopped = next((f for f in failures if f["type"] == "TrainingStopped"), None)
    if stopped or ending.stop_requested:
        message = stopped["message"] if stopped else "training stopped on request"
        if ending.ended_after_grace:
            message = f"{message}; it did not stop in time and its processes were ended; {_checkpoint_text(request)}"
        raise TrainingStopped(message)
    if ending.hung:
        raise TrainingProcessDied(f"training made no progress for the hang timeout and was ended; {_checkpoint_text(request)}")
    folder = Path(request.checkpoint_dir).parent
    if _out_of_space(ending, failures, folder):  # one line naming where, not a writer's traceback without a path
        raise OSError(errno.ENOSPC, f"No space left on device for the training run; free space there and run "
                                    f"again ({_checkpoint_text(request)})", str(folder))
    for failure in failures:
        kind = getattr(errors, failure["type"], None) or getattr(builtins, failure["type"], None)
        if isinstance(kind, type) and issubclass(kind, (errors.LoraflowError, errors.TrainingOutOfMemory, OSError)):
            raise kind(failure["message"])
    if failures:
        log("training process traceback:\n" + failures[0].get("traceback", ""))
        raise TrainingProcessFailed(f"training failed: {failures[0]['type']}: {failures[0]['message']}")
    killed = _exit_signal(ending)
    how = f"was killed by {killed}" if killed else f"exited with code {ending.code} without a result"
    log("training process output (last lines):\n" + "\n".join(ending.tail[-15:]))
    raise TrainingProcessDied(f"the training process {how}; {_checkpoint_text(request)}")


def _forward(on_progress: Callable[[ProgressUpdate], None] | None, log: Callable[[str], None]) -> Callable[[dict], None]:
    def on_event(event: dict) -> None:
        if event["kind"] == "log":
            log(event["value"])
        elif event["kind"] == "progress" and on_progress is not None:
            on_progress(ProgressUpdate.model_validate(event["value"]))
    return on_event


def run_training(
    request: TrainRequest,
    lease: DeviceLease,
    options: LaunchOptions | None = None,
    on_progress: Callable[[ProgressUpdate], None] | None = None,
    log: Callable[[str], None] = print,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train `request` on the leased devices in a torchrun process tree (one rank per device, on
    each of `options.nnodes` nodes); see the module docstring for how each ending is reported."""
    options = options or LaunchOptions()
    started_at = _now()
    request = request.model_copy(update={"processes": len(lease.ids) * options.nnodes})
    job_dir = Path(request.checkpoint_dir).parent / ".training"
    settings = request.settings
    while True:
        attempt = request.model_copy(update={"settings": settings})
        prepare_checkpoints(attempt, log)
        shutil.rmtree(job_dir, ignore_errors=True)
        for folder in ("errors", "pids"):
            (job_dir / folder).mkdir(parents=True)
        job = WorkerJob(request=attempt, stop_file=str(job_dir / "stop"), result_file=str(job_dir / "result.json"),
                        errors_dir=str(job_dir / "errors"), pids_dir=str(job_dir / "pids"), launcher_pid=os.getpid(),
                        callbacks=options.callbacks)
        atomic_write_json(job_dir / "job.json", job.model_dump())
        if options.nnodes > 1:  # what the other nodes' `python -m loraflow.train.launch join` need
            atomic_write_json(job_dir / "launch.json", {"options": options.model_dump(), "nproc_per_node": len(lease.ids)})
        env = {**os.environ, **lease.env(), "PYTHONUNBUFFERED": "1"}
        tree = _ProcessTree(job_dir, torchrun_command(job_dir / "job.json", len(lease.ids), options), env,
                            Path(request.logs_dir) / "train-process.log")
        _RUNNING.add(tree)
        if _STOP_EVERYTHING.is_set():
            tree.request_stop()
        try:
            ending = _supervise(tree, options, _forward(on_progress, log), should_stop, log)
        finally:
            _RUNNING.discard(tree)
        failures = _rank_errors(job_dir)
        if ending.code == 0 and (job_dir / "result.json").is_file():
            result = TrainResult.model_validate_json((job_dir / "result.json").read_text(encoding="utf-8"))
            return result.model_copy(update={"devices": lease.labels, "processes": attempt.processes,
                                             "nnodes": options.nnodes, "started_at": started_at, "finished_at": _now()})
        out_of_memory = next((f for f in failures if f["type"] == "OutOfMemoryError"), None)
        if out_of_memory and not ending.stop_requested:
            settings = smaller_batch(settings, RuntimeError(out_of_memory["message"]), log)
            continue
        _raise_for(ending, failures, request, log)


def join_command(run_root: str | Path, timeout_s: float = 600) -> tuple[list[str], int]:
    """On another node of a multi-node training: wait for the first node's job in the shared run
    folder, and return the torchrun command that runs this node's ranks (and how many devices)."""
    job_dir = Path(run_root).resolve() / ".training"
    deadline = time.monotonic() + timeout_s
    while not (job_dir / "launch.json").is_file():
        if time.monotonic() > deadline:
            raise ConfigError(f"{job_dir}: no multi-node training job appeared within {timeout_s:g}s; is the first node "
                              "running, and is the run folder on a volume every node mounts?")
        time.sleep(1)
    launch = json.loads((job_dir / "launch.json").read_text(encoding="utf-8"))
    job = WorkerJob.model_validate_json((job_dir / "job.json").read_text(encoding="utf-8"))
    local = job_dir / f"job-{os.uname().nodename}.json"  # this node's ranks watch this node's launcher
    atomic_write_json(local, job.model_copy(update={"launcher_pid": os.getpid()}).model_dump())
    options = LaunchOptions.model_validate(launch["options"])
    return torchrun_command(local, launch["nproc_per_node"], options), launch["nproc_per_node"]


def join(run_root: str | Path) -> int:
    """`python -m loraflow.train.launch join <run folder>`: this node's share of a multi-node training."""
    from loraflow.devices import lease_devices

    command, devices = join_command(run_root)
    with lease_devices(devices, f"node of {run_root}") as lease:
        return subprocess.run(command, env={**os.environ, **lease.env(), "PYTHONUNBUFFERED": "1"}).returncode


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "join":
        print("usage: python -m loraflow.train.launch join RUN_FOLDER", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(join(sys.argv[2]))
