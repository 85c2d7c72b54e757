"""loraflow's blocks: storage both pools read, training infrastructure defaults, the hub token
kept secret, registration with `prefect block register -m blocks`, and the dispatch choice."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
from prefect.blocks.system import Secret
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.settings import PREFECT_API_URL

from blocks import HUB_TOKEN_BLOCK, LoraflowStorage, TrainingInfrastructure, use_hub_token
from flows.train import concurrency_limit_for_worker
from orchestration.dispatch import should_dispatch
from tests.test_flow_single import REPO


def test_storage_is_a_local_path_or_any_fsspec_url(tmp_path):
    local = LoraflowStorage(basepath=str(tmp_path)).result_storage()
    assert isinstance(local, LocalFileSystem) and local.basepath == str(tmp_path / ".loraflow-results")
    assert LoraflowStorage(basepath=f"file://{tmp_path}").result_storage().basepath == local.basepath
    remote = LoraflowStorage(basepath="s3://bucket/loraflow/")
    assert isinstance(remote.result_storage(), RemoteFileSystem)
    assert remote.result_storage().basepath == "s3://bucket/loraflow/.loraflow-results"
    assert remote.result_storage_slug() == "remote-file-system/loraflow-results"


def test_job_variables_merge_block_defaults_storage_and_the_runs_own():
    infrastructure = TrainingInfrastructure(
        job_variables={"env": {"CUDA_VISIBLE_DEVICES": "0", "HF_HOME": "/cache"}, "working_dir": "/srv"}
    )
    merged = infrastructure.job_variables_for(
        {"env": {"CUDA_VISIBLE_DEVICES": "1"}}, {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "x/y"}
    )
    assert merged == {
        "working_dir": "/srv",
        "env": {"CUDA_VISIBLE_DEVICES": "1", "HF_HOME": "/cache", "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "x/y"},
    }


def test_gpu_slots_per_pool_and_per_named_worker(monkeypatch):
    infrastructure = TrainingInfrastructure(gpu_slots=2, workers={"gpu-1": 1, "gpu-2": 4})
    assert infrastructure.limits() == {"gpu": 2, "gpu:gpu-1": 1, "gpu:gpu-2": 4}
    monkeypatch.delenv("WORKER_ID", raising=False)
    assert concurrency_limit_for_worker("gpu") == "gpu"
    monkeypatch.setenv("WORKER_ID", "gpu-1")
    assert concurrency_limit_for_worker("gpu") == "gpu:gpu-1"


def test_training_stays_inline_outside_a_deployment_unless_asked():
    assert not should_dispatch("auto") and not should_dispatch("inline")
    assert should_dispatch("deployment")


def test_block_register_and_defaults(prefect_server):
    api = PREFECT_API_URL.value()
    env = {**os.environ, "PREFECT_API_URL": api}
    registered = subprocess.run([sys.executable, "-m", "prefect", "block", "register", "-m", "blocks"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert registered.returncode == 0, registered.stdout + registered.stderr
    for slug in ("loraflow-storage", "loraflow-training-infrastructure"):
        assert httpx.get(f"{api}/block_types/slug/{slug}").status_code == 200
    assert TrainingInfrastructure.load_or_default("not-saved") == TrainingInfrastructure()
    TrainingInfrastructure(gpu_slots=3).save("custom", overwrite=True)
    assert TrainingInfrastructure.load_or_default("custom").gpu_slots == 3


def test_hub_token_comes_from_a_secret_block_and_is_never_shown(prefect_server, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert use_hub_token("no-such-secret") is False and "HF_TOKEN" not in os.environ
    Secret(value="hf_not_a_real_token").save(HUB_TOKEN_BLOCK, overwrite=True)
    saved = Secret.load(HUB_TOKEN_BLOCK)
    assert "hf_not_a_real_token" not in repr(saved) and "hf_not_a_real_token" not in str(saved.model_dump())
    assert use_hub_token() is True and os.environ["HF_TOKEN"] == "hf_not_a_real_token"
