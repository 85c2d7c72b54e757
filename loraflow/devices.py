"""The devices of this host, and exclusive leases on them for training and evaluation.

A Prefect global concurrency limit only counts; it cannot say *which* GPU a run may use.
So every process that runs model work on this host takes a lease on concrete devices: an
exclusive `flock` on one lock file per device. The kernel drops the lock when its holder
dies (SIGKILL and the OOM killer included), so a lease can never leak, and two trainings on
one host never share a device. The child process that does the work sees only the leased
devices (`CUDA_VISIBLE_DEVICES`), or, on a CPU host, its share of the cores as torch threads.

Which devices a host has is found, not configured: the GPUs `nvidia-smi -L` lists (narrowed
by `LORAFLOW_DEVICES=0,2` or an inherited `CUDA_VISIBLE_DEVICES`), else
`LORAFLOW_CPU_DEVICES` CPU slots (default 1).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO

from loraflow.errors import ConfigError, TrainingStopped

WAIT_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class HostDevices:
    """`kind` is `cuda` or `cpu`; `ids` are CUDA ordinals as the host numbers them, or CPU slot numbers."""

    kind: str
    ids: tuple[str, ...]
    cores: int

    @property
    def threads_per_slot(self) -> int:
        """Torch threads for a process holding one CPU slot: the host's cores shared out, unless
        OMP_NUM_THREADS says how many each process should use."""
        if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
            return int(os.environ["OMP_NUM_THREADS"])
        return max(1, self.cores // max(1, len(self.ids)))


def _cpu_slots() -> int:
    raw = os.environ.get("LORAFLOW_CPU_DEVICES", "1")
    try:
        slots = int(raw)
    except ValueError:
        slots = 0
    if slots < 1:
        raise ConfigError(f"LORAFLOW_CPU_DEVICES: {raw!r} is not a whole number of CPU slots (1 or more)")
    return slots


def _listed_gpus() -> tuple[str, ...]:
    """GPU ordinals the NVIDIA driver reports, without importing torch (seconds in a flow process)."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    lines = [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]
    return tuple(str(index) for index in range(len(lines))) if listing.returncode == 0 else ()


def _narrowed(found: tuple[str, ...]) -> tuple[str, ...]:
    chosen = os.environ.get("LORAFLOW_DEVICES") or os.environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is None:
        return found
    ids = tuple(part.strip() for part in chosen.split(",") if part.strip())
    unknown = [device for device in ids if device not in found]
    if unknown:
        raise ConfigError(f"LORAFLOW_DEVICES / CUDA_VISIBLE_DEVICES name GPUs {unknown} this host lacks ({list(found)})")
    return ids


@lru_cache(maxsize=None)
def _host_devices(cpu_slots: int, narrowing: tuple[str | None, str | None]) -> HostDevices:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus = _listed_gpus()
    if gpus and narrowing != (None, ""):
        return HostDevices("cuda", _narrowed(gpus), cores)
    return HostDevices("cpu", tuple(str(slot) for slot in range(cpu_slots)), cores)


def host_devices() -> HostDevices:
    """This host's devices (remembered per setting of the variables that narrow them)."""
    narrowing = (os.environ.get("LORAFLOW_DEVICES"), os.environ.get("CUDA_VISIBLE_DEVICES"))
    return _host_devices(_cpu_slots(), narrowing)


def locks_dir() -> Path:
    """One folder per host (per `LORAFLOW_DEVICE_LOCKS` when set), shared by every user's runs."""
    folder = Path(os.environ.get("LORAFLOW_DEVICE_LOCKS") or Path(tempfile.gettempdir()) / "loraflow-devices")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        folder.chmod(0o1777)  # every account on the host shares the GPUs, so every account takes leases here
    except PermissionError:
        pass
    return folder


@dataclass
class DeviceLease:
    """Devices held until the lease is closed; `env()` is what the child process that uses them needs."""

    host: HostDevices
    ids: tuple[str, ...]
    _files: list[IO[str]] = field(default_factory=list, repr=False)

    @property
    def labels(self) -> list[str]:
        """`cuda:0`, `cuda:3`, or `cpu:1`: what `result.json` records."""
        return [f"{self.host.kind}:{device}" for device in self.ids]

    def env(self) -> dict[str, str]:
        threads = str(self.host.threads_per_slot)
        if self.host.kind == "cuda":
            return {"CUDA_VISIBLE_DEVICES": ",".join(self.ids), "OMP_NUM_THREADS": threads}
        # No GPU to hide, but a child must not find one either; its torch uses its share of the cores.
        return {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "LORAFLOW_TORCH_THREADS": threads}


def _try_lock(path: Path) -> IO[str] | None:
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _write_holder(handle: IO[str], holder: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"holder": holder, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
    handle.flush()


def holder_of(host: HostDevices, device: str) -> str:
    """Who holds a device, as its lock file says: `run 'x' (pid 12, since 10:04:05)`."""
    try:
        note = json.loads((locks_dir() / f"{host.kind}-{device}.lock").read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return "unknown"
    since = time.strftime("%H:%M:%S", time.localtime(note.get("since", 0)))
    return f"{note.get('holder', '?')} (pid {note.get('pid', '?')}, since {since})"


def _acquire_all(host: HostDevices, count: int, holder: str) -> DeviceLease | None:
    """`count` free devices at once or none: never hold some while waiting for more (no deadlock)."""
    taken: list[tuple[str, IO[str]]] = []
    for device in host.ids:
        handle = _try_lock(locks_dir() / f"{host.kind}-{device}.lock")
        if handle is not None:
            taken.append((device, handle))
            if len(taken) == count:
                for _, held in taken:
                    _write_holder(held, holder)
                return DeviceLease(host, tuple(d for d, _ in taken), [h for _, h in taken])
    for _, handle in taken:
        handle.close()
    return None


def check_devices(count: int) -> HostDevices:
    """Refuse, before any work, a training that asks for more devices than this host has."""
    host = host_devices()
    if count > len(host.ids):
        fix = "set LORAFLOW_CPU_DEVICES" if host.kind == "cpu" else "lower `devices`, or free LORAFLOW_DEVICES"
        raise ConfigError(f"devices: {count} asked for, but this host has {len(host.ids)} {host.kind} slot(s); {fix}")
    return host


@contextmanager
def lease_devices(
    count: int,
    holder: str,
    log: Callable[[str], None] = print,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[DeviceLease]:
    """Hold `count` devices of this host for the duration; waits (saying so once, with who holds them)
    while they are busy, and gives up with `TrainingStopped` when `should_stop` says the run was cancelled."""
    host = check_devices(count)
    lease, told = _acquire_all(host, count, holder), False
    while lease is None:
        if not told:
            held = "; ".join(f"{host.kind}:{device} by {holder_of(host, device)}" for device in host.ids)
            log(f"waiting for {count} free {host.kind} device(s): {held}")
            told = True
        if should_stop is not None and should_stop():
            raise TrainingStopped(f"{holder}: cancelled while waiting for a device; nothing was trained")
        time.sleep(WAIT_POLL_SECONDS)
        lease = _acquire_all(host, count, holder)
    with ExitStack() as stack:
        for handle in lease._files:
            stack.callback(handle.close)  # closing the file drops its lock
        yield lease
