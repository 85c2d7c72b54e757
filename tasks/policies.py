"""Retry policy shared by loraflow's Prefect tasks.

Retries: only failures that can go away on their own are retried (I/O trouble, a
CUDA out-of-memory while another job holds the GPU). A `LoraflowError` means the input
or configuration is wrong; retrying it would only delay the error the user must see.

Caching: each stage's key is said with the stage in `loraflow.pipeline`, from content
fingerprints (dataset, resolved config, base model, code version) plus where the outputs go,
never from Prefect run ids, so an identical re-run is served from cache and any real change
recomputes.
"""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from loraflow.errors import LoraflowError, TrainingOutOfMemory

RETRY_DELAYS = exponential_backoff(backoff_factor=2)
RETRY_JITTER = 0.2


def _is_out_of_memory(error: BaseException) -> bool:
    """torch's CUDA OutOfMemoryError (matched by name: no torch import here), or training's own give-up."""
    if isinstance(error, TrainingOutOfMemory) or type(error).__name__ == "OutOfMemoryError":
        return True
    return "out of memory" in str(error).lower()


def is_transient(error: BaseException) -> bool:
    if isinstance(error, LoraflowError):
        return False
    return isinstance(error, (OSError, TimeoutError, ConnectionError)) or _is_out_of_memory(error)


def retry_transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn`: continue to the retry policy only for transient failures, and never
    once the run was asked to stop (a model process that died of the terminal's Ctrl-C)."""
    from orchestration.prefect_workarounds import interrupted

    if interrupted():
        return False
    try:
        state.result()
    except BaseException as error:  # the task's own exception, re-raised by result()
        return is_transient(error)
    return False


def transient_retries(retries: int = 2) -> dict[str, Any]:
    """The retry options of every loraflow task: transient failures only, exponential backoff with jitter."""
    return {
        "retries": retries,
        "retry_delay_seconds": RETRY_DELAYS,
        "retry_jitter_factor": RETRY_JITTER,
        "retry_condition_fn": retry_transient_only,
    }
