"""Model work (evaluation, sample predictions, a model's module names) in processes of its own.

transformers 5 patches process-global torch state while it builds a model (default dtype,
meta-device creation, weight tying), so two models built in sibling threads of one process
corrupt each other (`Cannot copy out of meta tensor`). Rather than make a batch's datasets or a
grid's variants take turns under a lock, each piece of model work runs in a worker process
that does one job at a time: one process per leased device (it sees only that device, and
keeps torch imported between jobs), and one for work on the meta device that needs none.

The functions are named as `module:function` so that the caller never imports torch.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from loraflow.devices import DeviceLease

_POOLS: dict[tuple[str, ...], ProcessPoolExecutor] = {}
_POOLS_GUARD = threading.Lock()  # guards the dict of pools, not model work
NO_DEVICE_ENV = {"CUDA_VISIBLE_DEVICES": "", "LORAFLOW_TORCH_THREADS": "1"}


class ModelProcessDied(ChildProcessError):
    """The model worker process died mid-job (killed, out of memory); transient: a retry starts a new one."""


def _pin(env: dict[str, str]) -> None:
    """Runs first in each worker process: before torch is imported, so the device choice holds."""
    os.environ.update(env)
    if threads := env.get("LORAFLOW_TORCH_THREADS"):
        import torch

        torch.set_num_threads(int(threads))


def _call(function: str, args: tuple, kwargs: dict) -> Any:
    module, _, name = function.partition(":")
    try:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    finally:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next job in this process, or another process, may need the memory


def _pool(key: tuple[str, ...], env: dict[str, str]) -> ProcessPoolExecutor:
    with _POOLS_GUARD:
        if key not in _POOLS:
            _POOLS[key] = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_pin, initargs=(env,)
            )
        return _POOLS[key]


def run_model_work(function: str, *args: Any, lease: DeviceLease | None = None, **kwargs: Any) -> Any:
    """`module:function(*args, **kwargs)` in the worker process of the leased device (or the
    device-less one), returning its result or raising its exception."""
    key, env = (tuple(lease.labels), lease.env()) if lease is not None else (("meta",), NO_DEVICE_ENV)
    pool = _pool(key, env)
    try:
        return pool.submit(_call, function, args, kwargs).result()
    except BrokenProcessPool:
        with _POOLS_GUARD:
            if _POOLS.get(key) is pool:
                del _POOLS[key]
        raise ModelProcessDied(f"the model process for {', '.join(key)} died while running {function}") from None
