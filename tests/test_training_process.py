"""Training as its own torchrun process tree: DDP on the CPU with two gloo processes, the launch
command, device leases, a child killed from outside, a hung child, and out-of-memory per child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from loraflow.devices import host_devices, lease_devices
from loraflow.errors import ConfigError, TrainingOutOfMemory, TrainingStopped
from loraflow.settings import LoraSettings
from loraflow.train.checkpoints import find_resumable_checkpoint
from loraflow.train.launch import (
    LaunchOptions,
    TrainingProcessDied,
    join_command,
    run_training,
    torchrun_command,
)
from loraflow.train.worker import WorkerJob
from tasks.policies import is_transient
from tests.test_train import adapter_weights, request_for, tiny_llama  # noqa: F401  (tiny_llama is a fixture)

NO_DROPOUT = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules="auto")
quiet = lambda message: None  # noqa: E731


@pytest.fixture
def two_cpu_slots(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLOW_CPU_DEVICES", "2")
    monkeypatch.setenv("LORAFLOW_DEVICE_LOCKS", str(tmp_path / "device-locks"))


def processes_of(job_dir: Path) -> list[psutil.Process]:
    """Every live process whose command line names this training job."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(job_dir) in part for part in process.info["cmdline"] or []):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return [p for p in found if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def step_losses(logs_dir: str) -> dict[int, float]:
    lines = (Path(logs_dir) / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines) if "loss" in record}


def test_two_gloo_processes_train_the_same_steps_as_one_process_with_the_whole_batch(tmp_path, tiny_llama, two_cpu_slots):
    model_path, train = tiny_llama
    one = request_for(tmp_path / "one", model_path, "causal-lm", [train], batch_size=4, lora=NO_DROPOUT, num_epochs=2)
    two = request_for(tmp_path / "two", model_path, "causal-lm", [train], batch_size=2, lora=NO_DROPOUT, num_epochs=2)

    with lease_devices(1, "one process") as lease:
        single = run_training(one, lease, log=quiet)
    with lease_devices(2, "two processes") as lease:
        ddp = run_training(two, lease, log=quiet)

    assert (single.processes, ddp.processes) == (1, 2)
    assert ddp.devices == ["cpu:0", "cpu:1"] and single.devices == ["cpu:0"]
    assert ddp.global_step == single.global_step == 12, "same optimiser steps: 24 rows at 4 per step, 2 epochs"
    expected, actual = step_losses(one.logs_dir), step_losses(two.logs_dir)
    assert expected.keys() == actual.keys()
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=2e-3), step
    for name, weight in adapter_weights(single.adapter_dir).items():
        torch.testing.assert_close(adapter_weights(ddp.adapter_dir)[name], weight, atol=2e-4, rtol=1e-3, msg=name)
    assert len((Path(two.logs_dir) / "metrics.jsonl").read_text().splitlines()) == len(
        (Path(one.logs_dir) / "metrics.jsonl").read_text().splitlines()), "rank 0 alone writes metrics.jsonl"
    for when in (ddp.started_at, ddp.finished_at):
        assert when.endswith("+00:00")


def test_a_classifier_on_two_processes_logs_and_learns_at_the_scale_of_one(tmp_path, two_cpu_slots):
    """transformers scales each rank's loss by the number of processes for token-averaged losses; a
    classifier's loss is a batch mean, so without `average_tokens_across_devices=False` its DDP loss
    (and gradients) came out twice as large. Dropout differs per rank, hence the loose bound."""
    from transformers import AutoTokenizer

    from loraflow.models import bundled_minilm_dir
    from tests.tiny_models import classification_rows, easy_classification_examples, write_shard

    model_path = str(bundled_minilm_dir())
    rows = classification_rows(AutoTokenizer.from_pretrained(model_path), easy_classification_examples(32))
    train = write_shard(tmp_path / "train.parquet", rows)
    first_losses = []
    for devices, batch in ((1, 8), (2, 4)):
        request = request_for(tmp_path / f"d{devices}", model_path, "sequence-classification", [train], num_epochs=1,
                              batch_size=batch)
        with lease_devices(devices, f"classifier on {devices}") as lease:
            run_training(request, lease, log=quiet)
        first_losses.append(step_losses(request.logs_dir)[1])
    assert 0.8 < first_losses[1] / first_losses[0] < 1.25, first_losses


def test_single_and_multi_node_launch_commands(tmp_path):
    single = torchrun_command("/runs/x/.training/job.json", 2, LaunchOptions(), launcher_pid=123, python="python")
    torchrun = single[single.index("torch.distributed.run") + 1:]
    assert single[:2] == ["python", "-c"] and single[3] == "123"
    assert torchrun == ["--nproc-per-node=2", "--standalone", "--max-restarts=0", "-m", "loraflow.train.worker",
                        "/runs/x/.training/job.json"]
    alone = torchrun_command("/runs/x/.training/job.json", 1, LaunchOptions(), launcher_pid=123, python="python")
    assert alone[3:] == ["123", "-m", "loraflow.train.worker", "/runs/x/.training/job.json"], \
        "one device on one node is its one rank, without torchrun's agent"

    env = {"LORAFLOW_RDZV_ENDPOINT": "train-0.train:29400", "LORAFLOW_RDZV_ID": "run-7"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        options = LaunchOptions(nnodes=4).with_rendezvous(run_id="ignored")
    multi = torchrun_command("job.json", 8, options, launcher_pid=1, python="python")
    assert multi[multi.index("torch.distributed.run") + 1:][:5] == [
        "--nproc-per-node=8", "--nnodes=4", "--rdzv-backend=c10d", "--rdzv-endpoint=train-0.train:29400",
        "--rdzv-id=run-7"]

    job_dir = tmp_path / "run" / ".training"
    job_dir.mkdir(parents=True)
    request = request_for(tmp_path / "run", "/models/llama", "causal-lm", [str(tmp_path / "train.parquet")])
    job = WorkerJob(request=request, stop_file="s", result_file="r", errors_dir="e", pids_dir="p", launcher_pid=1)
    (job_dir / "job.json").write_text(job.model_dump_json())
    (job_dir / "launch.json").write_text(json.dumps({"options": options.model_dump(), "nproc_per_node": 8}))
    joined, devices = join_command(tmp_path / "run")
    assert devices == 8 and joined[joined.index("torch.distributed.run") + 1:][:5] == multi[
        multi.index("torch.distributed.run") + 1:][:5], "every node joins the same rendezvous"
    local_job = WorkerJob.model_validate_json(Path(joined[-1]).read_text())
    assert local_job.launcher_pid == os.getpid() and local_job.request == request

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("LORAFLOW_RDZV_ENDPOINT", raising=False)
        with pytest.raises(ConfigError, match=r"^nnodes: 2 nodes need LORAFLOW_RDZV_ENDPOINT"):
            LaunchOptions(nnodes=2).with_rendezvous()


def test_device_leases_are_exclusive_and_say_who_holds_them(two_cpu_slots):
    assert host_devices().ids == ("0", "1")
    messages: list[str] = []
    with lease_devices(2, "run 'first'") as first:
        assert first.env()["CUDA_VISIBLE_DEVICES"] == "" and first.env()["OMP_NUM_THREADS"] == str(
            host_devices().threads_per_slot)
        stop = threading.Event()
        threading.Timer(1.5, stop.set).start()
        with pytest.raises(TrainingStopped, match="cancelled while waiting for a device"):
            with lease_devices(1, "run 'second'", log=messages.append, should_stop=stop.is_set):
                pass
    assert len(messages) == 1 and "run 'first'" in messages[0] and f"pid {os.getpid()}" in messages[0]
    with lease_devices(1, "third") as third, lease_devices(1, "fourth") as fourth:
        assert {third.ids, fourth.ids} == {("0",), ("1",)}
    with pytest.raises(ConfigError, match=r"^devices: 3 asked for, but this host has 2 cpu slot\(s\); set LORAFLOW_CPU"):
        with lease_devices(3, "too many"):
            pass


def test_a_lease_of_a_killed_process_is_free_at_once(two_cpu_slots):
    holder = subprocess.Popen([sys.executable, "-c", (
        "from loraflow.devices import lease_devices; import time\n"
        "with lease_devices(2, 'doomed'):\n    print('held', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with lease_devices(2, "next", should_stop=lambda: True):  # would raise if it had to wait
        pass


def _start_in_thread(request, options, lease, errors: list):
    def train():
        try:
            run_training(request, lease, options, log=quiet)
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            errors.append(error)
    thread = threading.Thread(target=train)
    thread.start()
    return thread


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_child_fails_with_the_signal_and_the_checkpoint_and_the_next_run_resumes(tmp_path, tiny_llama):
    model_path, train = tiny_llama
    request = request_for(tmp_path, model_path, "causal-lm", [train], num_epochs=100, save_steps=2)
    job_dir = tmp_path / ".training"
    errors: list[BaseException] = []
    with lease_devices(1, "killed") as lease:
        thread = _start_in_thread(request, LaunchOptions(), lease, errors)
        _wait_for(lambda: find_resumable_checkpoint(request.checkpoint_dir, quiet), 120, "a checkpoint")
        rank = int(_wait_for(lambda: next((job_dir / "pids").glob("rank-0.pid"), None), 30, "the rank").read_text())
        os.kill(rank, signal.SIGKILL)
        thread.join(timeout=60)
    assert not thread.is_alive() and len(errors) == 1
    error = errors[0]
    assert isinstance(error, TrainingProcessDied) and is_transient(error)
    assert "killed by SIGKILL" in str(error) and "last complete checkpoint: checkpoint-" in str(error), str(error)
    assert "a retry or the next run resumes from it" in str(error)
    assert not processes_of(job_dir), "no process of the killed training is left"
    step = int(Path(find_resumable_checkpoint(request.checkpoint_dir, quiet)).name.split("-")[1])

    messages: list[str] = []
    with lease_devices(1, "resumed") as lease:
        resumed = run_training(request, lease, LaunchOptions(), log=messages.append)
    assert resumed.resumed_from_step is not None and resumed.resumed_from_step >= step, messages[:8]
    assert any(m.startswith(f"resuming from checkpoint-{resumed.resumed_from_step} ") for m in messages)


def test_a_stop_request_checkpoints_and_a_hung_child_is_ended(tmp_path, tiny_llama):
    model_path, train = tiny_llama
    request = request_for(tmp_path / "stop", model_path, "causal-lm", [train], num_epochs=1000, save_steps=1000)
    asked = threading.Event()
    with lease_devices(1, "stopped") as lease:
        log: list[str] = []

        def should_stop() -> bool:
            return asked.is_set()

        thread_errors: list[BaseException] = []

        def stopped_training():
            try:
                run_training(request, lease, log=log.append, should_stop=should_stop)
            except BaseException as error:  # noqa: BLE001
                thread_errors.append(error)
        thread = threading.Thread(target=stopped_training)
        thread.start()
        _wait_for(lambda: any(line.startswith("step 3/") for line in log), 120, "training steps")
        asked.set()
        thread.join(timeout=60)
    assert len(thread_errors) == 1 and isinstance(thread_errors[0], TrainingStopped), thread_errors
    assert str(thread_errors[0]).startswith("training stopped on request at step ")
    assert find_resumable_checkpoint(request.checkpoint_dir, quiet), "the stop saved a checkpoint"
    assert not processes_of(Path(request.checkpoint_dir).parent / ".training")

    hung = request_for(tmp_path / "hung", model_path, "causal-lm", [train], num_epochs=1000, save_steps=1000)
    errors: list[BaseException] = []
    job_dir = tmp_path / "hung" / ".training"
    with lease_devices(1, "hung") as lease:
        thread = _start_in_thread(hung, LaunchOptions(hang_timeout_s=20), lease, errors)
        rank = int(_wait_for(lambda: next((job_dir / "pids").glob("rank-0.pid"), None), 60, "the rank").read_text())
        _wait_for(lambda: (Path(hung.logs_dir) / "metrics.jsonl").is_file(), 120, "a first step")
        os.kill(rank, signal.SIGSTOP)  # alive, but no step will ever end
        thread.join(timeout=60)
    assert len(errors) == 1 and isinstance(errors[0], TrainingProcessDied), errors
    assert str(errors[0]).startswith("training made no progress for the hang timeout and was ended")
    assert not processes_of(job_dir)


def test_out_of_memory_in_the_child_restarts_it_with_half_the_batch(tmp_path, tiny_llama):
    model_path, train = tiny_llama
    request = request_for(tmp_path, model_path, "causal-lm", [train], lora=NO_DROPOUT, num_epochs=1)
    options = LaunchOptions(callbacks=["tests.faults:OutOfMemoryAboveBatchTwo"])
    messages: list[str] = []
    with lease_devices(1, "oom") as lease:
        result = run_training(request, lease, options, log=messages.append)
    assert (result.batch_size, result.gradient_accumulation_steps, result.resumed_from_step) == (2, 2, 2)
    assert any(m.startswith("warning: out of memory at batch_size 4; retrying from the last checkpoint with "
                            "batch_size 2, gradient_accumulation_steps 2") for m in messages), messages

    always = LaunchOptions(callbacks=["tests.faults:OutOfMemoryAlways"])
    with lease_devices(1, "oom for ever") as lease, pytest.raises(TrainingOutOfMemory):
        run_training(request_for(tmp_path / "always", model_path, "causal-lm", [train], batch_size=2), lease, always,
                     log=quiet)
