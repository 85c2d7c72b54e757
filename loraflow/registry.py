"""A file-based adapter registry: numbered versions per name, aliases, idempotent registration.

Layout under the registry root::

    <root>/<name>/index.json     versions, aliases and alias history (written atomically)
    <root>/<name>/v<N>/          a frozen copy of the adapter folder plus card.json

A version is keyed by the fingerprint of everything that produced it (dataset, resolved
config, base model, code), so registering the same inputs twice returns the existing
version. Every read-modify-write of an index holds an exclusive file lock, so concurrent
runs never lose an update; the index is replaced atomically, so readers never see half of it.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from loraflow.config import check_safe_name
from loraflow.errors import ConfigError
from loraflow.layout import atomic_write_json


class RegistryVersion(BaseModel):
    name: str
    version: int
    key: str
    path: str
    created: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    passed: bool = False
    card: dict[str, Any] = Field(default_factory=dict)


class RegistryIndex(BaseModel):
    name: str
    versions: list[RegistryVersion] = Field(default_factory=list)
    aliases: dict[str, int] = Field(default_factory=dict)
    alias_history: dict[str, list[int]] = Field(default_factory=dict)


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def _entry(self, name: str) -> Path:
        return self.root / check_safe_name(name, "registry name")

    @contextmanager
    def _locked(self, name: str) -> Iterator[RegistryIndex]:
        """Hold the name's lock while the caller reads and changes its index; save on success."""
        entry = self._entry(name)
        entry.mkdir(parents=True, exist_ok=True)
        with open(entry / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                index = self._read(name)
                yield index
                atomic_write_json(entry / "index.json", index.model_dump())
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self, name: str) -> RegistryIndex:
        path = self._entry(name) / "index.json"
        if not path.exists():
            return RegistryIndex(name=name)
        return RegistryIndex.model_validate(json.loads(path.read_text(encoding="utf-8")))

    def index(self, name: str) -> RegistryIndex:
        return self._read(name)

    def register(
        self,
        name: str,
        adapter_dir: str | Path,
        key: str,
        card: dict[str, Any],
        metrics: dict[str, Any],
        passed: bool,
    ) -> tuple[RegistryVersion, bool]:
        """Add `adapter_dir` as the next version of `name`; returns (version, created)."""
        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ConfigError(f"registry: {adapter_dir} holds no adapter (adapter_config.json missing)")
        with self._locked(name) as index:
            for existing in index.versions:
                if existing.key == key:
                    return existing, False
            number = max((v.version for v in index.versions), default=0) + 1
            target = self._entry(name) / f"v{number}"
            staging = Path(tempfile.mkdtemp(dir=self._entry(name), prefix=f".v{number}-"))
            shutil.copytree(adapter_dir, staging, dirs_exist_ok=True)
            atomic_write_json(staging / "card.json", {"name": name, "version": number, "key": key, **card})
            if target.exists():  # left by a crash between copy and index write: never indexed, safe to replace
                shutil.rmtree(target)
            staging.rename(target)
            version = RegistryVersion(
                name=name,
                version=number,
                key=key,
                path=str(target),
                created=datetime.now(timezone.utc).isoformat(),
                metrics=metrics,
                passed=passed,
                card=card,
            )
            index.versions.append(version)
            return version, True

    def promote(self, name: str, version: int, alias: str) -> None:
        """Point `alias` (e.g. `production`, `best`) at `version`, remembering the previous target."""
        with self._locked(name) as index:
            if not any(v.version == version for v in index.versions):
                raise ConfigError(f"registry: {name} has no version {version}")
            previous = index.aliases.get(alias)
            if previous == version:
                return
            if previous is not None:
                index.alias_history.setdefault(alias, []).append(previous)
            index.aliases[alias] = version

    def rollback(self, name: str, alias: str) -> int:
        """Move `alias` back to the version it pointed at before the last promotion."""
        with self._locked(name) as index:
            history = index.alias_history.get(alias) or []
            if not history:
                raise ConfigError(f"registry: alias {alias!r} of {name} has no earlier version to roll back to")
            index.aliases[alias] = history.pop()
            return index.aliases[alias]

    def resolve(self, name: str, alias_or_version: str | int) -> RegistryVersion:
        index = self._read(name)
        number = index.aliases.get(str(alias_or_version), alias_or_version)
        for version in index.versions:
            if str(version.version) == str(number):
                return version
        raise ConfigError(f"registry: {name} has no version or alias {alias_or_version!r}")
