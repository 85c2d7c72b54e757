"""The default infrastructure loraflow trains on: which deployment, pool, job variables, GPU slots."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field

DEFAULT_BLOCK_NAME = "default"


class TrainingInfrastructure(Block):
    """Where dispatched training runs and how many run at once.

    `gpu_slots` is the size of the global concurrency limit every training run holds a slot
    of; `workers` names GPU workers (started with `WORKER_ID=<name>`) and their own slots,
    so each machine's GPUs are limited independently (limit `<limit>:<worker>`).
    """

    _block_type_name = "Loraflow Training Infrastructure"
    _description = "The training deployment, its GPU work pool, default job variables and GPU slots."

    deployment: str = Field(default="train/gpu", description="The training deployment, `flow/deployment`.")
    work_pool: str = Field(default="loraflow-gpu", description="The GPU work pool the training deployment runs on.")
    job_variables: dict[str, Any] = Field(
        default_factory=dict,
        description="Job variables for every training run, e.g. {'env': {'CUDA_VISIBLE_DEVICES': '0'}}.",
    )
    concurrency_limit: str = Field(default="gpu", description="Global concurrency limit a training run holds a slot of.")
    gpu_slots: int = Field(default=1, ge=1, description="Training runs at once across the pool.")
    workers: dict[str, int] = Field(
        default_factory=dict, description="Named GPU workers (WORKER_ID) and the training runs each may hold at once."
    )

    @classmethod
    def load_or_default(cls, name: str = DEFAULT_BLOCK_NAME) -> "TrainingInfrastructure":
        """The saved block, or the built-in defaults when the set-up has not saved one."""
        try:
            return cls.load(name)
        except ValueError:
            return cls()

    def limits(self) -> dict[str, int]:
        """Every global concurrency limit this infrastructure needs, with its slots."""
        return {self.concurrency_limit: self.gpu_slots} | {
            worker_limit_name(self.concurrency_limit, worker): slots for worker, slots in self.workers.items()
        }

    def job_variables_for(self, overrides: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
        """This block's job variables, then `env`, then the run's own overrides (env merged key by key)."""
        merged = {**self.job_variables, **overrides}
        merged["env"] = {**self.job_variables.get("env", {}), **env, **overrides.get("env", {})}
        return merged


def worker_limit_name(limit: str, worker: str) -> str:
    """Prefect's per-worker pattern: one global limit per named worker."""
    return f"{limit}:{worker}"
