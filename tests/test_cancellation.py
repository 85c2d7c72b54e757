"""Cancelling a flow run (UI, `prefect flow-run cancel`, API: all set it Cancelling) stops training
at its next step, saves a checkpoint a later run resumes from, and ends the run Cancelled."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, FlowRunFilterParentTaskRunId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL

from loraflow.devices import lease_devices
from loraflow.errors import TrainingStopped
from loraflow.train.checkpoints import checkpoint_problem, find_resumable_checkpoint
from loraflow.train.trainer import train_adapter
from tests.test_crash_resume import NAME, params_for, start_run, wait_for_checkpoint
from tests.test_train import request_for, tiny_llama  # noqa: F401  (tiny_llama is a fixture)
from tests.test_training_process import processes_of


def test_a_stop_request_saves_a_checkpoint_that_the_next_run_resumes_from(tmp_path, tiny_llama):
    model_path, train = tiny_llama
    request = request_for(tmp_path, model_path, "causal-lm", [train], save_steps=100)  # no scheduled checkpoint
    asked: list[bool] = []

    def should_stop() -> bool:
        asked.append(True)
        return True

    with pytest.raises(TrainingStopped, match=r"^training stopped on request at step 1 of 18; checkpoint-1 is saved"):
        train_adapter(request, log=lambda message: None, should_stop=should_stop)
    assert asked == [True], "asked once, after the first step"
    checkpoints = Path(request.checkpoint_dir)
    assert find_resumable_checkpoint(checkpoints, log=lambda message: None) == str(checkpoints / "checkpoint-1")
    assert not Path(request.adapter_dir).exists()

    messages: list[str] = []
    resumed = train_adapter(request, log=messages.append, should_stop=lambda: False)

    assert resumed.resumed_from_step == 1 and resumed.global_step == 18
    assert "resuming from checkpoint-1 (step 1 of 18)" in messages


def top_level_run(client, output_dir: Path):
    """The `single` run started with these parameters (not its subflows)."""
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True)),
        sort=FlowRunSort.START_TIME_DESC, limit=20,
    )
    return next(run for run in runs if run.parameters.get("params", {}).get("output_dir") == str(output_dir))


def test_cancelling_stops_training_at_a_checkpoint_and_ends_the_run_cancelled(prefect_server, tmp_path):
    output_dir = tmp_path / "runs"
    checkpoints = output_dir / NAME / "checkpoints"
    # Many epochs: the cancel must land mid-training even when the `prefect` CLI is slow to start.
    params = params_for(tmp_path, output_dir, limit="gpu-cancel-test", num_epochs=30)
    process = start_run(params, tmp_path / "params.yaml")
    first = wait_for_checkpoint(process, checkpoints)

    with get_client(sync_client=True) as client:
        run = top_level_run(client, output_dir)
        cancelled_at = time.monotonic()
        cancel = subprocess.run([str(Path(sys.executable).parent / "prefect"), "flow-run", "cancel", str(run.id)],
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        code = process.wait(timeout=120)
        stopped_in = time.monotonic() - cancelled_at
        final = client.read_flow_run(run.id).state
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))

    log = (tmp_path / "params.log").read_text()
    assert code == 1, log[-4000:]
    assert stopped_in < 60, f"training took {stopped_in:.0f}s to stop (the CLI itself takes ~10s to start)"
    assert final.is_cancelled(), final
    assert [(r.name, r.state.type.value) for r in subflows if r.name == NAME] == [(NAME, "CANCELLED")], \
        "the train-evaluate subflow ends Cancelled, not Failed"
    assert final.message.startswith("training stopped on request at step ")
    last_line = log.strip().splitlines()[-1]
    assert last_line.startswith("error: training stopped on request at step ") and "run again to resume" in last_line
    step = int(final.message.split("at step ")[1].split()[0])
    kept = find_resumable_checkpoint(checkpoints, log=lambda message: None)
    assert kept == str(checkpoints / f"checkpoint-{step}") and checkpoint_problem(Path(kept)) is None
    assert int(Path(first).name.split("-")[1]) <= step
    assert not (output_dir / NAME / "model" / "adapter_model.safetensors").exists()
    assert not processes_of(output_dir / NAME / ".training"), "no process of the cancelled training is left"
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu-cancel-test").active_slots == 0
    with lease_devices(1, "after the cancel", should_stop=lambda: True):  # raises if the device were still held
        pass
