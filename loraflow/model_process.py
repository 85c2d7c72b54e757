"""Model work (evaluation, sample predictions, a model's module names) in processes of its own.

transformers 5 patches process-global torch state while it builds a model (default dtype,
meta-device creation, weight tying), so two models built in sibling threads of one process
corrupt each other (`Cannot copy out of meta tensor`). Rather than make a batch's datasets or a
grid's variants take turns under a lock, each piece of model work runs in a worker process
that does one job at a time: one process per leased device (it sees only that device, and
keeps torch imported between jobs), and one for work on the meta device that needs none.

The worker is `python -m loraflow.model_process`, fed pickled `(function, args, kwargs)` on its
stdin and answering on its stdout. Written by hand rather than with `ProcessPoolExecutor`
because a spawned pool re-imports the parent's `__main__` (the flow file, Prefect with it:
seconds per process) and cannot be told to die with its parent. The functions are named as
`module:function`, so the caller never imports torch.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
import warnings
from typing import IO, Any

from loraflow.devices import DeviceLease, host_devices

NO_DEVICE_ENV = {"CUDA_VISIBLE_DEVICES": "", "LORAFLOW_TORCH_THREADS": "1"}
# What model work imports (transformers, peft, the Trainer): about 5 s of a cold worker's first job on 2 cores.
WARM_UP_IMPORTS = ("loraflow.evaluate", "loraflow.samples")
_HEADER = struct.Struct("!Q")


class ModelProcessDied(ChildProcessError):
    """The model worker process died mid-job (killed, out of memory); transient: a retry starts a new one."""


def _send(stream: IO[bytes], value: Any) -> None:
    data = pickle.dumps(value)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    return pickle.loads(stream.read(_HEADER.unpack(header)[0]))


class _Worker:
    """One worker process and the pipe to it; one job at a time on the pipe."""

    def __init__(self, env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loraflow.model_process"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, **env},
            start_new_session=True,  # a terminal's Ctrl-C reaches the flow, which decides; the worker dies with it
        )
        self.turn = threading.Lock()  # the pipe carries one request and its answer at a time

    def call(self, function: str, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        with self.turn:
            try:
                _send(self.process.stdin, (function, args, kwargs))
                return _receive(self.process.stdout)
            except (EOFError, BrokenPipeError, OSError):
                self.process.kill()
                raise ModelProcessDied(f"the model process (pid {self.process.pid}) died while running {function}; "
                                       f"exit code {self.process.wait()}") from None


_WORKERS: dict[tuple[str, ...], _Worker] = {}
_WORKERS_GUARD = threading.Lock()  # guards the dict of workers, not model work


def _worker(key: tuple[str, ...], env: dict[str, str]) -> _Worker:
    with _WORKERS_GUARD:
        if key not in _WORKERS or _WORKERS[key].process.poll() is not None:
            _WORKERS[key] = _Worker(env)
        return _WORKERS[key]


def stop_model_processes() -> None:
    """End every model process of this process now: on exit, and when an interrupted run exits at once."""
    with _WORKERS_GUARD:
        for worker in _WORKERS.values():
            worker.process.kill()
            worker.process.wait()
        _WORKERS.clear()


atexit.register(stop_model_processes)  # a worker waits for its next job otherwise, until it sees the exit


def _key_and_env(lease: DeviceLease | None) -> tuple[tuple[str, ...], dict[str, str]]:
    return (tuple(lease.labels), lease.env()) if lease is not None else (("meta",), NO_DEVICE_ENV)


def warm_model_processes(count: int) -> list[threading.Thread]:
    """Start the model processes of this host's first `count` devices (those a lease takes first)
    in the background, each importing what model work needs, and return at once (with the threads
    that wait for the imports): a run calls it as its data stages start, so its baseline, and a
    grid's first evaluation on each device, find a warm process instead of paying the imports.
    Holds no device: a job for the process waits for its lease, then for the imports to end."""
    host, threads = host_devices(), []
    for device in host.ids[:count]:
        key, env = _key_and_env(DeviceLease(host, (device,)))
        threads.append(threading.Thread(target=_warm_up, args=(key, env), name=f"warm {key[0]}", daemon=True))
        threads[-1].start()
    return threads


def _warm_up(key: tuple[str, ...], env: dict[str, str]) -> None:
    try:
        _worker(key, env).call("loraflow.model_process:import_modules", (WARM_UP_IMPORTS,), {})
    except ModelProcessDied:
        pass  # stopped meanwhile (an interrupted run): the next job starts a new one


def import_modules(names: tuple[str, ...]) -> None:
    for name in names:
        importlib.import_module(name)


def run_model_work(function: str, *args: Any, lease: DeviceLease | None = None, **kwargs: Any) -> Any:
    """`module:function(*args, **kwargs)` in the worker process of the leased device (or the
    device-less one), returning its result or raising its exception."""
    key, env = _key_and_env(lease)
    ok, value = _worker(key, env).call(function, args, kwargs)
    if not ok:
        raise value
    return value


def _exit_with_parent(parent: int) -> None:
    """No worker outlives its flow process, even mid-job (a prctl death signal would follow the
    thread that started the worker, which may end first)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _serve() -> None:
    """The worker's loop: until its stdin closes (the flow process ended), run each job it is sent."""
    requests, answers = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, never into the answers
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    import torch

    if threads := os.environ.get("LORAFLOW_TORCH_THREADS"):
        torch.set_num_threads(int(threads))
    # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` whenever it wraps a model:
    # a FutureWarning on the terminal at every evaluation, about nothing the user did.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    while True:
        try:
            function, args, kwargs = _receive(requests)
        except EOFError:
            return
        module, _, name = function.partition(":")
        try:
            answer = (True, getattr(importlib.import_module(module), name)(*args, **kwargs))
        except Exception as error:  # noqa: BLE001 - the caller re-raises it
            answer = (False, error)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the next job, or another process, may need the memory
        try:
            _send(answers, answer)
        except (pickle.PicklingError, TypeError, AttributeError):
            _send(answers, (False, RuntimeError(f"{function}: {answer[1]!r}")))


if __name__ == "__main__":
    _serve()
