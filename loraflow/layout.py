"""The predictable folder layout of one run, and atomic writes into it."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUBDIRS = ("data", "config", "model", "eval", "samples", "logs")
CACHE_DIRNAME = ".loraflow-cache"


def cache_dir(output_dir: str | Path) -> Path:
    """`<output_dir>/.loraflow-cache`: Prefect's result storage (the stage cache) and what the
    core remembers about models, shared by every run under one output root."""
    return Path(output_dir).resolve() / CACHE_DIRNAME


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
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
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


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
