"""Transient failures are retried with backoff; configuration and data errors fail at once.

The real training task runs under the session's Prefect server and the attempts are counted
from the server's record of the task run (`run_count`).
"""

from __future__ import annotations

import pytest
import torch
from prefect import flow
from prefect.client.orchestration import get_client
from transformers import AutoTokenizer

from loraflow.data.prepare import prepare_dataset
from loraflow.errors import ConfigError, DataError, TrainingOutOfMemory, TrainingStopped
from loraflow.models import bundled_minilm_dir
from loraflow.plan import plan_run, resolve_config
from tasks.policies import is_transient
from tasks.training import train_adapter_task
from tests.test_flow_single import classification_params
from tests.test_train import request_for
from tests.tiny_models import classification_rows, easy_classification_examples, write_shard

CLASSIFICATION = "sequence-classification"


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (OSError("Input/output error"), True),
        (ConnectionError("reset by peer"), True),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (TrainingOutOfMemory("training ran out of memory even at batch_size 1"), True),
        (ConfigError("overrides.learning_rate: must be > 0"), False),
        (DataError("data.csv:3: mixes label types"), False),
        (TrainingStopped("training stopped on request at step 4"), False),
        (ValueError("a bug"), False),
    ],
)
def test_what_counts_as_transient(error, transient):
    assert is_transient(error) is transient


@flow
def train_once(config, request) -> tuple[str, int]:
    """The real training task, with its real retry policy minus the backoff wait: its final error
    and how many attempts the server recorded."""
    fast = train_adapter_task.with_options(retry_delay_seconds=0, retry_jitter_factor=None)
    state = fast(config, request, "gpu-retry-test", return_state=True)
    with get_client(sync_client=True) as client:
        run_count = client.read_task_run(state.state_details.task_run_id).run_count
    return type(state.result(raise_on_failure=False)).__name__, run_count


@pytest.fixture(scope="module")
def minilm_request(tmp_path_factory):
    root = tmp_path_factory.mktemp("retries")
    model_path = str(bundled_minilm_dir())
    rows = classification_rows(AutoTokenizer.from_pretrained(model_path), easy_classification_examples(8))
    return root, request_for(root, model_path, CLASSIFICATION, [write_shard(root / "train.parquet", rows)])


def test_an_io_error_is_retried_and_a_config_error_is_not(prefect_server, minilm_request, tmp_path):
    _, request = minilm_request
    params = classification_params(tmp_path)
    plan = plan_run(params)
    config = resolve_config(plan, prepare_dataset(params.dataset, params.task, tmp_path / "data"))
    (tmp_path / "blocker").write_text("a file where the checkpoint folder should go")
    io_failure = request.model_copy(update={"checkpoint_dir": str(tmp_path / "blocker" / "checkpoints")})
    config_failure = request.model_copy(update={"labels": None})

    assert train_once(config, io_failure) == ("NotADirectoryError", 1 + train_adapter_task.retries)
    assert train_once(config, config_failure) == ("ConfigError", 1)


def test_retries_back_off_exponentially_with_jitter():
    delays = train_adapter_task.retry_delay_seconds
    assert train_adapter_task.retries == 2 and delays == sorted(delays) and delays[1] == 2 * delays[0]
    assert train_adapter_task.retry_jitter_factor and train_adapter_task.retry_condition_fn is not None
