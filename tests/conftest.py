"""Shared test set-up: offline, isolated Prefect home, one Prefect test server per session."""

import json
import os
import tempfile

# Before anything imports prefect or transformers: isolate state and forbid the network.
_PREFECT_HOME = tempfile.mkdtemp(prefix="loraflow-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_HOME, "results")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# Device leases of the tests' trainings stay apart from any real run's on this host.
os.environ["LORAFLOW_DEVICE_LOCKS"] = os.path.join(_PREFECT_HOME, "device-locks")
# What runs remember about base models, shared by the session's xdist workers and its subprocesses,
# and kept out of the developer's own ~/.cache/loraflow.
os.environ.setdefault("LORAFLOW_CACHE_DIR", os.path.join(tempfile.gettempdir(), "loraflow-test-model-memos"))
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("LORAFLOW_RDZV_ENDPOINT", None)  # a multi-node rendezvous of the shell is not the tests'
os.environ["LORAFLOW_USE_RUNNING_SERVER"] = "0"  # a bare run in a test never joins a developer's own server
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Prefect test server and Dask threads share the 2 cores with torch; two OpenMP threads
# spin-waiting on a busy core made training tests 5-10x slower and erratic.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

# The suite runs on 2 pytest-xdist workers, a file to a worker (`--dist loadfile`, so a module's
# expensive fixtures are built once). The longest files start first, so the last to finish is short.
LONGEST_FIRST = ["test_production.py", "test_benchmarks_smoke.py", "test_interrupts.py", "test_deployments.py"]


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


def pytest_terminal_summary(terminalreporter):
    """Figures a test measured (`record_property("figures: ...", value)`), printed at the end of
    the run: under xdist a test's own prints never reach the terminal."""
    for report in terminalreporter.getreports("passed"):
        for name, value in report.user_properties:
            if name.startswith("figures: "):
                terminalreporter.write_line(f"{name.removeprefix('figures: ')}: {json.dumps(value)}")


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole session: starting one costs ~15 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def production(tmp_path_factory):
    """A Prefect server on PostgreSQL with the set-up and workers for both pools (~40 s to start),
    shared by the load and fault tests; skips when no PostgreSQL answers."""
    from tests.production_stack import production_stack

    with production_stack(tmp_path_factory.mktemp("production")) as stack:
        yield stack
