"""Content fingerprints: the identity of data, configs and code that cache keys are built from."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(value: Any) -> str:
    """Stable hash of a JSON-serialisable value (key order does not matter)."""
    return hash_bytes(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode())


def hash_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: str | Path, pattern: str = "*") -> str:
    """Hash of every file below `root` matching `pattern`, names included, order-independent."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(hash_file(path).encode())
    return digest.hexdigest()


def source_version(*files: str | Path) -> str:
    """Fingerprint of some source files: what a cache key carries so that a code change invalidates it."""
    return hash_bytes(b"".join(Path(file).name.encode() + b"\0" + Path(file).read_bytes() for file in files))


@lru_cache(maxsize=1)
def code_version() -> str:
    """Fingerprint of the loraflow core source and presets: a code change invalidates caches."""
    package_root = Path(__file__).resolve().parent
    files = sorted(p for pattern in ("*.py", "*.yaml") for p in package_root.rglob(pattern) if "__pycache__" not in p.parts)
    return source_version(*files)[:16]
