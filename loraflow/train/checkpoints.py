"""Which Trainer checkpoint a restarted run may resume from, and which ones it must not trust.

A crash can leave the newest checkpoint half written, and a checkpoint folder may hold
checkpoints of a different configuration. Both are detected here, before the Trainer
reads them, so resuming never starts from a state that is not what this run would have made.
The Trainer writes a checkpoint file by file, so a checkpoint counts as complete only once
`mark_checkpoint_complete` has flushed its files and renamed a marker into it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError, safe_open

from loraflow.fingerprint import hash_file, hash_json
from loraflow.layout import atomic_write_text
from loraflow.models import model_identity
from loraflow.train.request import TrainRequest

# Settings that change what is logged or kept, not the weights: a change must not discard checkpoints.
# The batch split is neutral too: only the effective batch (batch_size x accumulation x processes)
# shapes the optimiser steps, so a run that halved its batch after an out-of-memory error resumes
# the same checkpoints.
_RESUME_NEUTRAL_SETTINGS = {
    "save_steps", "save_total_limit", "logging_steps", "eval_batch_size", "max_new_tokens",
    "batch_size", "gradient_accumulation_steps",
}
FINGERPRINT_FILE = "loraflow_config_fingerprint.txt"
COMPLETE_MARKER = "loraflow_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TRAINING_STATE = ("optimizer.pt", "scheduler.pt")


def checkpoint_steps(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """`(step, path)` of every `checkpoint-N` folder, highest step first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found, reverse=True)


def read_trainer_state(path: Path) -> dict:
    """The Trainer's own record of a checkpoint: global_step, max_steps, log history."""
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def mark_checkpoint_complete(path: Path) -> None:
    """Flush every file of a just-written checkpoint to disk, then atomically add the marker."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    atomic_write_text(path / COMPLETE_MARKER, json.dumps({"files": sorted(p.name for p in path.iterdir())}) + "\n")


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from, or None when it is complete."""
    if not (path / COMPLETE_MARKER).is_file():
        return "it was never marked complete (interrupted while saving)"
    try:
        state = read_trainer_state(path)
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (OSError, ValueError) as error:
        return f"trainer_state.json is unreadable ({error})"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json has no global_step"
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        return "adapter weights are missing"
    try:
        with safe_open(weights, "pt"):  # reads the header, and checks the file is as long as it says
            pass
    except (OSError, SafetensorError) as error:
        return f"adapter weights are unreadable ({error})"
    missing = [name for name in _TRAINING_STATE if not (path / name).is_file()]
    return f"{' and '.join(missing)} missing" if missing else None


def find_resumable_checkpoint(checkpoint_dir: str | Path, log: Callable[[str], None] = print) -> str | None:
    """The highest-step complete checkpoint; incomplete ones are skipped with a warning saying why."""
    for _, path in checkpoint_steps(checkpoint_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        log(f"warning: skipping {path.name}: {problem}")
    return None


def discard_checkpoints_after(checkpoint_dir: str | Path, step: int, log: Callable[[str], None] = print) -> None:
    """Delete checkpoints past the resume point: they are broken, and the resumed run rewrites those steps."""
    for later_step, path in checkpoint_steps(checkpoint_dir):
        if later_step > step:
            log(f"removing {path.name}: training resumes from step {step}")
            shutil.rmtree(path)


def claim_checkpoint_dir(checkpoint_dir: str | Path, fingerprint: str, log: Callable[[str], None] = print) -> None:
    """Make `checkpoint_dir` hold only checkpoints of this configuration, wiping it when another one wrote it."""
    root = Path(checkpoint_dir)
    marker = root / FINGERPRINT_FILE
    recorded = marker.read_text(encoding="utf-8").strip() if marker.is_file() else None
    if recorded != fingerprint and any(root.iterdir() if root.is_dir() else ()):
        log(f"warning: ignoring the checkpoints in {root}: a different configuration wrote them")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, fingerprint + "\n")


def config_fingerprint(request: TrainRequest) -> str:
    """What determines the trained weights: the request minus its paths, plus model and data identity.
    Only the effective batch counts (per-device batch x accumulation x processes): any split of it
    trains the same optimiser steps, so its checkpoints stay valid."""
    settings = request.settings.model_dump(exclude=_RESUME_NEUTRAL_SETTINGS)
    settings["effective_batch_size"] = request.effective_batch_size
    return hash_json(
        {
            "model": model_identity(request.model_path),
            "task": request.task,
            "labels": request.labels,
            "seed": request.seed,
            "settings": settings,
            "train_data": [hash_file(path) for path in request.train_shards],
        }
    )


def prepare_checkpoints(request: TrainRequest, log: Callable[[str], None] = print) -> str | None:
    """Make the checkpoint folder this configuration's, drop checkpoints past the resume point, and
    return the checkpoint to resume from. Done once before training starts (by the launcher, before
    any rank exists), because several ranks changing one folder would race."""
    claim_checkpoint_dir(request.checkpoint_dir, config_fingerprint(request), log)
    resume_from = find_resumable_checkpoint(request.checkpoint_dir, log)
    if resume_from:
        discard_checkpoints_after(request.checkpoint_dir, int(read_trainer_state(Path(resume_from))["global_step"]), log)
    return resume_from
