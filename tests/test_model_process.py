"""Model processes: one per device, warmed while the data stages run."""

from __future__ import annotations

import os
import sys

import pytest

from loraflow import model_process
from loraflow.devices import DeviceLease, host_devices


def loaded_here(names: list[str]) -> tuple[int, list[str]]:
    """Runs in the model process: its pid and which of `names` it has imported."""
    return os.getpid(), [name for name in names if name in sys.modules]


@pytest.fixture
def no_model_processes():
    model_process.stop_model_processes()
    yield
    model_process.stop_model_processes()


def test_a_warmed_model_process_has_imported_model_work_before_its_first_job(monkeypatch, no_model_processes):
    monkeypatch.setenv("LORAFLOW_CPU_DEVICES", "3")
    host = host_devices()
    threads = model_process.warm_model_processes(2)
    for thread in threads:
        thread.join(timeout=120)
    assert len(threads) == 2 and not any(thread.is_alive() for thread in threads)
    warmed = {key: worker.process.pid for key, worker in model_process._WORKERS.items()}
    assert sorted(warmed) == [("cpu:0",), ("cpu:1",)]  # the first two devices, not the third

    pid, loaded = model_process.run_model_work("tests.test_model_process:loaded_here", ["transformers", "peft"],
                                               lease=DeviceLease(host, ("1",)))
    assert pid == warmed[("cpu:1",)] and loaded == ["transformers", "peft"]
    _, cold = model_process.run_model_work("tests.test_model_process:loaded_here", ["transformers"],
                                           lease=DeviceLease(host, ("2",)))
    assert cold == []  # a process started by its first job has imported only torch
