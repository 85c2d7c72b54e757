"""Error types that tell the orchestration layer what may be retried.

`LoraflowError` and its subclasses are *permanent*: the input or the configuration is
wrong, and running the same thing again cannot help. Prefect tasks never retry them.
Anything else (I/O trouble, out-of-memory) is treated as possibly transient.
"""


class LoraflowError(Exception):
    """A permanent, user-fixable problem. The message is one line: what, where, how to fix."""


class ConfigError(LoraflowError):
    """Parameters, preset or overrides are invalid."""


class DataError(LoraflowError):
    """The dataset cannot be used (missing, empty, malformed beyond the reject bound...)."""


class ModelError(LoraflowError):
    """The model reference does not point at a usable model."""


class RegistryError(LoraflowError):
    """A registry version's folder is missing or incomplete and cannot be restored from this run."""


class TrainingStopped(LoraflowError):
    """Training was asked to stop (the run was cancelled); the last checkpoint is saved for a resume."""


class TrainingOutOfMemory(RuntimeError):
    """Out of memory even at per-device batch size 1. Not a `LoraflowError`: memory another job
    holds may be free on a later attempt, so the orchestration layer retries it with backoff."""
