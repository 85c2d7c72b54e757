"""Where loraflow keeps what both work pools must read: the training flow's persisted result.

The pipeline (CPU pool) reads the training flow's return value (GPU pool) back through
Prefect's result storage, so that storage must be reachable from every worker: a local
path on one host or a shared mount, or any fsspec URL (`s3://bucket/loraflow`) across hosts.
Run outputs, checkpoints and the registry live under the run's `output_dir`/`registry_dir`,
which take file locks and atomic renames, so across hosts they belong on a shared mount.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from prefect.blocks.core import Block
from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem
from pydantic import Field

RESULTS_BLOCK_NAME = "loraflow-results"
RESULTS_SUBDIR = ".loraflow-results"


class LoraflowStorage(Block):
    """Storage every loraflow worker can read: persisted flow results live under `<basepath>/.loraflow-results`."""

    _block_type_name = "Loraflow Storage"
    _description = "Where loraflow keeps results that the CPU and GPU work pools both read (a path or fsspec URL)."

    basepath: str = Field(
        description="A local path, a shared mount, or an fsspec URL such as s3://bucket/loraflow.",
        examples=["/mnt/shared/loraflow", "s3://my-bucket/loraflow"],
    )

    def result_storage(self) -> WritableFileSystem:
        """The Prefect file system for persisted results: local for a path, fsspec for a URL."""
        if urllib.parse.urlsplit(self.basepath).scheme in ("", "file"):
            local = Path(self.basepath.removeprefix("file://")).expanduser().resolve()
            return LocalFileSystem(basepath=str(local / RESULTS_SUBDIR))
        return RemoteFileSystem(basepath=f"{self.basepath.rstrip('/')}/{RESULTS_SUBDIR}")

    def result_storage_slug(self) -> str:
        """The slug `PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK` takes (saved by the set-up)."""
        return f"{type(self.result_storage()).get_block_type_slug()}/{RESULTS_BLOCK_NAME}"
