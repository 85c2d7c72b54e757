"""Kill -9 in the middle of training, run the same parameters again: training resumes from the last
complete checkpoint, the result matches an uninterrupted run, and the registry gets one version.

The runs are real `python flows/single.py params.yaml` processes pointed at the session's
Prefect server (PREFECT_API_URL), so nothing of the killed process survives in memory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from flows.single import single
from loraflow.config import SingleParams
from loraflow.registry import Registry
from loraflow.train.checkpoints import find_resumable_checkpoint
from tests.production_stack import wait_for
from tests.test_flow_single import write_messy_csv
from tests.tiny_models import easy_classification_examples

REPO = Path(__file__).resolve().parents[1]
NAME = "reviews"
# ~9 optimiser steps per epoch: long enough to kill between checkpoints, short enough for CI.
SLOW_ENOUGH = {"num_epochs": 5, "learning_rate": 0.005, "save_steps": 4, "batch_size": 8, "max_length": 32}


def params_for(tmp_path: Path, output_dir: Path, limit: str, **overrides) -> dict:
    data = tmp_path / "reviews.csv"
    if not data.exists():
        write_messy_csv(data, easy_classification_examples(90, seed=1))
    return {
        "dataset": {"path": str(data), "name": NAME},
        "overrides": {**SLOW_ENOUGH, **overrides},
        "gates": {"accuracy": 0.8},
        "output_dir": str(output_dir),
        "shard_size": 200,
        "gpu_concurrency_limit": limit,
    }


def start_run(params: dict, params_file: Path, script: str = "single.py", env: dict | None = None) -> subprocess.Popen:
    """`python flows/<script> params.yaml` against the session's test server, output to a log file."""
    from prefect.settings import PREFECT_API_URL

    params_file.write_text(yaml.safe_dump(params))
    log = open(params_file.with_suffix(".log"), "w")
    return subprocess.Popen(
        [sys.executable, str(REPO / "flows" / script), str(params_file)],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), **(env or {})},
    )


def wait_for_checkpoint(process: subprocess.Popen, checkpoint_dir: Path, timeout: float = 240) -> str:
    """The first complete checkpoint the running process writes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find_resumable_checkpoint(checkpoint_dir, log=lambda message: None)
        if found:
            return found
        assert process.poll() is None, f"the run ended before writing a checkpoint (exit {process.returncode})"
        time.sleep(0.05)
    raise AssertionError(f"no complete checkpoint in {checkpoint_dir} after {timeout}s")


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line or environment contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            seen = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
            if text.encode() in seen and (proc / "stat").read_text().split()[2] != "Z":
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_killed_run_resumes_from_its_last_checkpoint_and_matches_an_uninterrupted_run(prefect_server, tmp_path):
    output_dir = tmp_path / "runs"
    params = params_for(tmp_path, output_dir, limit="gpu-crash-test")
    checkpoints = output_dir / NAME / "checkpoints"

    killed = start_run(params, tmp_path / "first.yaml")
    wait_for_checkpoint(killed, checkpoints)
    os.kill(killed.pid, signal.SIGKILL)  # no cleanup: not a signal handler, not a finally block
    killed.wait(timeout=30)
    # A rank whose launcher was killed saves a checkpoint of the step it is on, then exits.
    training = str(output_dir / NAME / ".training")
    wait_for("the orphaned training rank to exit", lambda: not processes_mentioning(training), timeout=90, interval=0.2)
    survivor = find_resumable_checkpoint(checkpoints, log=lambda message: None)
    step = int(Path(survivor).name.split("-")[1])
    assert not (output_dir / NAME / "model" / "adapter_model.safetensors").exists()

    rerun = start_run(params, tmp_path / "second.yaml")
    assert rerun.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-4000:]

    log = (tmp_path / "second.log").read_text()
    assert f"resuming from checkpoint-{step} (step {step} of " in log
    assert "released the 'gpu-crash-test' slot of process" in log, "the killed run's GPU slot was given back"
    result = json.loads((output_dir / NAME / "result.json").read_text())
    assert result["cached"]["train"] is False, "a killed training is never served from cache"
    assert result["cached"]["prepare"] is True, "finished stages of the killed run are reused"
    assert result["train"]["resumed_from_step"] == step
    assert [v.version for v in Registry(str(output_dir / "registry")).index(NAME).versions] == [1]

    clean = single(SingleParams(**params_for(tmp_path, tmp_path / "clean", limit="gpu-crash-test")), return_state=True)
    assert clean.is_completed(), clean.message
    expected = clean.result()
    assert result["train"]["global_step"] == expected.train["global_step"]
    for metric in ("accuracy", "f1_macro"):
        assert abs(result["metrics"][metric] - expected.metrics[metric]) <= 0.02, metric
    weights = [load_file(str(root / NAME / "model" / "adapter_model.safetensors")) for root in (output_dir, tmp_path / "clean")]
    for name in weights[1]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-4, rtol=1e-3, msg=name)


def test_a_slot_whose_holder_died_without_a_lease_is_given_back(prefect_server):
    """The temporary server of a bare `python flows/single.py` forgets leases when it exits: the
    next run on the host decrements the dead holder's slot itself, once."""
    from prefect.client.orchestration import get_client
    from prefect.logging import disable_run_logger

    from loraflow.layout import atomic_write_json
    from orchestration.prefect_workarounds import reclaim_dead_holders, slot_holders_dir

    limit = "gpu-orphan-test"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"limit": limit, "host": socket.gethostname(), "pid": int(dead.stdout), "lease_id": None,
              "since": time.time() - 5}
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(limit, 1)
        client.increment_concurrency_slots(names=[limit], slots=1, mode="concurrency")  # the dead process's slot
        atomic_write_json(slot_holders_dir() / "orphan.json", holder)
        with disable_run_logger():
            reclaim_dead_holders(limit)
            reclaim_dead_holders(limit)  # a second run finds nothing left to give back
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0
    assert not list(slot_holders_dir().glob("orphan*"))
