"""The predictable folder layout of one run, atomic writes into it, and the lock that keeps one
run at a time writing into a folder."""

from __future__ import annotations

import contextvars
import fcntl
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.errors import TrainingStopped

SUBDIRS = ("data", "config", "model", "eval", "samples", "logs")
CACHE_DIRNAME = ".loraflow-cache"
LOCK_FILENAME = ".lock"
LOCK_POLL_SECONDS = 0.5

# Run folders this process holds: resolved root -> the owner token of the hold. `_HOLDS` says which
# of them the current context took (a flow's body and what it calls, its subflows and the threads it
# starts with a copy of its context), so a nested hold of the same folder by the same run just goes
# on, while another run in this process (a batch's other dataset, in a thread of its own) waits.
_HELD: dict[Path, object] = {}
_HELD_GUARD = threading.Lock()
_HOLDS: contextvars.ContextVar[tuple[tuple[Path, object], ...]] = contextvars.ContextVar("loraflow_folder_holds",
                                                                                        default=())


def cache_dir(output_dir: str | Path) -> Path:
    """`<output_dir>/.loraflow-cache`: Prefect's result storage (the stage cache), shared by every
    run under one output root."""
    return Path(output_dir).resolve() / CACHE_DIRNAME


def model_memo_dir() -> Path:
    """What loraflow remembers about base models (their Linear module names), for every run of this
    user: `LORAFLOW_CACHE_DIR`, else `$XDG_CACHE_HOME/loraflow`, else `~/.cache/loraflow`, beside
    Hugging Face's own cache. Kept per user, not per output root: the answer depends on the model
    alone, and finding it imports torch in a process of its own (4 s on 2 cores), which a new
    output folder would otherwise pay on its first run."""
    if os.environ.get("LORAFLOW_CACHE_DIR"):
        return Path(os.environ["LORAFLOW_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "loraflow"


@dataclass(frozen=True)
class RunLayout:
    """`<output_dir>/<name>/{data,config,model,eval,samples,logs}`, `checkpoints/` and `result.json`."""

    root: Path

    @classmethod
    def create(cls, output_dir: str | Path, name: str) -> "RunLayout":
        layout = cls(Path(output_dir).resolve() / name)
        for sub in (*SUBDIRS, "checkpoints"):
            (layout.root / sub).mkdir(parents=True, exist_ok=True)
        return layout

    data = property(lambda self: self.root / "data")
    config = property(lambda self: self.root / "config")
    model = property(lambda self: self.root / "model")
    eval = property(lambda self: self.root / "eval")
    samples = property(lambda self: self.root / "samples")
    logs = property(lambda self: self.root / "logs")
    checkpoints = property(lambda self: self.root / "checkpoints")
    result = property(lambda self: self.root / "result.json")


def current_umask() -> int:
    """The process umask, read without changing it (`os.umask` can only set it: setting and
    restoring it would race with files other threads create meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022  # no procfs (macOS): the usual default


def honour_umask(path: str | Path, directory: bool = False) -> None:
    """Give a file or folder made by `tempfile` (always 0600 / 0700) the mode `open` or `mkdir`
    would have given it, so a team's other accounts can read outputs as with any other tool's."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file.
    A failed write names `path` (a full disk's error from write() names none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        honour_umask(tmp)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if error.filename is None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Any) -> Path:
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write` fills a staging folder beside `path`, which is then swapped in: a reader sees the old
    folder or the new one, never half of one (an adapter, a merged model)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging, retired = (final.parent / f".{final.name}.{kind}-{os.getpid()}" for kind in ("new", "old"))
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    if final.exists():
        os.replace(final, retired)
    os.replace(staging, final)
    shutil.rmtree(retired, ignore_errors=True)
    return final


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def folder_holder(root: str | Path) -> str:
    """Who holds a run folder's lock, as its lock file says: `run 'x' (pid 12 on gpu-3, since 10:04:05)`."""
    try:
        note = json.loads((Path(root) / LOCK_FILENAME).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return "unknown"
    since = time.strftime("%H:%M:%S", time.localtime(note.get("since", 0)))
    return f"run {note.get('run', '?')!r} (pid {note.get('pid', '?')} on {note.get('host', '?')}, since {since})"


@contextmanager
def lock_run_folder(
    root: str | Path,
    run: str,
    log: Callable[[str], None] = print,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[None]:
    """Hold `root` for one run: an exclusive `flock` on `<root>/.lock`, so two runs of the same
    parameters never write into one folder (two trainings into one `checkpoints/`).

    A second run waits, saying so once with who holds the folder, and then finds what the first
    produced in the cache; `should_stop` (a cancel, Ctrl-C) ends the wait with `TrainingStopped`.
    The kernel drops the lock when its holder dies, so a killed run never leaves the folder held.
    The lock file is never replaced (a rename would give waiters another file to lock), only rewritten.

    Re-entrant for the run that holds it: a hold taken inside a hold of the same folder, in the same
    context or one copied from it (a flow holds its folder for its whole body, its stages and
    subflow hold it again), just goes on. Another run in this process has a context of its own and
    waits like a run in another process (`flock` locks of two `open`s exclude each other).
    """
    root = Path(root).resolve()
    holds = _HOLDS.get()
    mine = dict(holds).get(root)
    with _HELD_GUARD:
        nested = mine is not None and _HELD.get(root) is mine  # still held: a copied context may outlive a hold
    if nested:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / LOCK_FILENAME, "a+", encoding="utf-8")
    try:
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            if not told:
                log(f"{root} is in use by {folder_holder(root)}; waiting for it to finish")
                told = True
            if should_stop is not None and should_stop():
                raise TrainingStopped(f"{run}: cancelled while waiting for {root}, which another run is writing")
            time.sleep(LOCK_POLL_SECONDS)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"run": run, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        handle.flush()
        owner = object()
        with _HELD_GUARD:
            _HELD[root] = owner
        _HOLDS.set((*holds, (root, owner)))
        try:
            yield
        finally:
            _HOLDS.set(holds)  # `set`, not `reset`: a context manager may be left from a copy of the context
            with _HELD_GUARD:
                _HELD.pop(root, None)
    finally:
        handle.close()  # closing the file drops the lock
