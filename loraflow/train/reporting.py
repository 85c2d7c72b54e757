"""The Trainer's own tracker integrations (`report_to`), made safe for a training that must finish.

`report_to` names the integrations a `TrackingRequest` asks for; transformers builds their
callbacks (TensorBoardCallback, MLflowCallback), which report from rank 0 only. `guard_trackers`
then gives each one the environment it reads (log folder, MLflow address, experiment and run id)
for the length of each of its calls, and turns any failure of theirs (a tracking server gone down
mid-training) into one logged warning after which that tracker is silent: a tracker never fails a
training. The environment is set per call, not for the process, so a training in the flow's own
process leaves the flow's environment as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps

from loraflow.tracking import TrackingRequest, safely


def report_to(tracking: TrackingRequest | None) -> list[str] | str:
    """TrainingArguments' `report_to`: the integrations asked for, or "none"."""
    return list(tracking.report_to) if tracking and tracking.report_to else "none"


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)  # mlflow's start_run removes MLFLOW_RUN_ID itself
            else:
                os.environ[key] = value


def guard_trackers(trainer, tracking: TrackingRequest | None, log: Callable[[str], None]) -> None:
    """Wrap every event handler of the Trainer's tracker callbacks: environment in, failures out."""
    if tracking is None or not tracking.report_to:
        return
    from transformers.integrations import MLflowCallback, TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and tracking.tensorboard_dir:
            callback.logging_dir = tracking.tensorboard_dir
        if isinstance(callback, (MLflowCallback, TensorBoardCallback)):
            _guard(callback, tracking.environment(), log)


def _guard(callback, environment: dict[str, str], log: Callable[[str], None]) -> None:
    tracker = type(callback).__name__.removesuffix("Callback")
    broken = []

    def warn(message: str) -> None:
        broken.append(message)
        log(f"warning: {message}")

    def guarded(handler):
        @wraps(handler)
        def call(*args, **kwargs):
            if broken:
                return None
            with _environment(environment):
                return safely(f"reporting to {tracker}", warn, lambda: handler(*args, **kwargs))

        return call

    for name in dir(callback):
        if name.startswith("on_") and callable(getattr(callback, name)):
            setattr(callback, name, guarded(getattr(callback, name)))
