"""Run pipeline stages as Prefect tasks while recording per-stage timings and cache hits.

A flow calls `stages.run("train", train_adapter_task, ...)` instead of the task directly:
results go to the run's result storage (where the cache lives), the stage's wall time and
whether Prefect served it from cache are recorded for `result.json`, and a cache hit whose
files have since been deleted is recomputed instead of handing back dangling paths.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prefect import Task, get_run_logger
from pydantic import BaseModel

from loraflow.config import RunSettings
from loraflow.errors import TrainingStopped
from loraflow.layout import cache_dir
from orchestration.prefect_workarounds import interrupted

# Result fields that hold messages for people, which start with a data file's path but name no output.
MESSAGE_FIELDS = {"warnings"}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in MESSAGE_FIELDS:
                yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _present(path: Path) -> bool:
    """A file that exists, or a folder with something in it (run layouts recreate empty folders)."""
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def missing_outputs(result: Any) -> list[str]:
    """Absolute paths that a (cached) result names but that are gone or emptied."""
    return [text for text in _strings(result) if text.startswith("/") and not _present(Path(text))]


def result_storage(params: RunSettings) -> Path:
    """Prefect result storage, where the cache lives: shared by every run under one output root."""
    return cache_dir(params.output_dir)


class StageRecorder:
    def __init__(self, result_storage: Path):
        self.result_storage = result_storage
        self.timings: dict[str, float] = {}
        self.cached: dict[str, bool] = {}

    def run(self, stage: str, task: Task, /, *args: Any, **kwargs: Any) -> Any:
        if reason := interrupted():  # Ctrl-C or SIGTERM: start nothing new
            raise TrainingStopped(f"{reason}: stopped before {stage}")
        started = time.monotonic()
        task = task.with_options(result_storage=self.result_storage)
        state = task(*args, return_state=True, **kwargs)
        result = state.result()
        if state.name == "Cached" and (gone := missing_outputs(result)):
            get_run_logger().warning(f"{stage}: cached result names deleted files ({gone[0]} ...); recomputing")
            state = task.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
            result = state.result()
        self._record(stage, time.monotonic() - started, state.name == "Cached")
        return result

    @contextmanager
    def timed(self, stage: str) -> Iterator[SimpleNamespace]:
        """Time a stage that is not a single task (a subflow); the caller sets `.cached`."""
        if reason := interrupted():
            raise TrainingStopped(f"{reason}: stopped before {stage}")
        started = time.monotonic()
        outcome = SimpleNamespace(cached=False)
        yield outcome
        self._record(stage, time.monotonic() - started, outcome.cached)

    def _record(self, stage: str, seconds: float, cached: bool) -> None:
        self.timings[stage] = round(seconds, 3)
        self.cached[stage] = cached
