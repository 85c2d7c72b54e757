"""The benchmarks keep working: each one, in smoke mode (a few rows and steps, one round),
runs its variants side by side and writes its tables, with a ratio per variant, to the results
file it is given. Targets are not asserted: smoke sizes say nothing about speed, and
benchmarks are not tests. The flows run against the session's Prefect test server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from benchmarks import (
    cached_rerun,
    gpu_training,
    orchestration_overhead,
    packing,
    preprocessing_scale,
    server_database,
    training_process,
    training_throughput,
    variations_sharing,
)
from benchmarks.common import RESULTS_PATH, markdown_table

RATIO = re.compile(r"^\d+\.\d\dx$")


@pytest.fixture(scope="module")
def api_url(prefect_server) -> str:
    return PREFECT_API_URL.value()


def run_smoke(benchmark, tmp_path: Path, api_url: str | None, *options: str):
    """Run a benchmark's smoke mode (against `api_url` when it takes one); check the results file it
    appended to; return its tables."""
    results = tmp_path / "RESULTS.md"
    results_before = RESULTS_PATH.read_bytes() if RESULTS_PATH.exists() else None
    server = ["--api-url", api_url] if api_url else []
    report = benchmark.main(["--smoke", "--results", str(results), *server, *options])
    text = results.read_text()
    assert text.startswith("# Benchmark results\n") and f"\n## {report.title}: " in text
    assert re.search(r"- machine: \d+ cores .* GiB, .*torch \S+, transformers \S+, peft \S+, prefect \S+", text)
    assert "- load average (1, 5, 15 min): " in text and "smoke run" in text
    for _, headers, rows in report.tables:
        assert rows and markdown_table(headers, rows) in text
    assert (RESULTS_PATH.read_bytes() if RESULTS_PATH.exists() else None) == results_before
    return report.tables


def column(table, header: str) -> list:
    _, headers, rows = table
    return [row[headers.index(header)] for row in rows]


def test_orchestration_overhead(tmp_path, api_url):
    wall, stages = run_smoke(orchestration_overhead, tmp_path, api_url, "--modes", "server")
    assert column(wall, "variant") == ["plain", "flow, running server"]
    assert column(wall, "wall ratio")[0] == "1.00x" and all(RATIO.match(r) for r in column(wall, "wall ratio"))
    assert column(stages, "stage") == [*orchestration_overhead.STAGE_NAMES, "outside stages"]
    plain_seconds = dict(zip(column(stages, "stage"), map(float, column(stages, "plain"))))
    assert plain_seconds["train"] > 0 and min(plain_seconds.values()) >= 0


def test_cached_rerun(tmp_path, api_url):
    (table,) = run_smoke(cached_rerun, tmp_path, api_url, "--modes", "server")
    assert column(table, "mode") == ["running server"]
    cached, stages = column(table, "stages cached")[0].split("/")
    assert cached == stages  # the second run is served from cache, every stage of it
    assert column(table, "second/first")[0].endswith("%")


def test_training_throughput(tmp_path, api_url):
    (table,) = run_smoke(training_throughput, tmp_path, api_url)
    assert column(table, "variant") == ["plain peft + Trainer", "loraflow training task"]
    assert all(float(value) > 0 for value in column(table, "samples/s"))
    assert all(RATIO.match(value) for value in column(table, "vs plain"))


def test_preprocessing_scale(tmp_path, api_url):
    (table,) = run_smoke(preprocessing_scale, tmp_path, api_url, "--sizes", "300")
    assert column(table, "variant") == list(preprocessing_scale.VARIANTS)[: None if preprocessing_scale.HAS_DATASETS else -1]
    assert column(table, "speed-up")[0] == "1.00x" and all(RATIO.match(r) for r in column(table, "speed-up"))
    assert all(float(value.replace(",", "")) > 0 for value in column(table, "rows/s"))
    assert all(float(value) > 0 for value in column(table, "peak MB"))


def test_packing(tmp_path, api_url):
    (table,) = run_smoke(packing, tmp_path, api_url)
    assert column(table, "variant") == ["padded batches", "packing: true"]
    assert column(table, "vs padded")[0] == "1.00x" and all(RATIO.match(r) for r in column(table, "vs padded"))
    padded_steps, packed_steps = column(table, "steps")
    assert packed_steps < padded_steps  # the same conversations in fewer, fuller rows


def test_variations_sharing(tmp_path, api_url):
    (table,) = run_smoke(variations_sharing, tmp_path, api_url)
    assert column(table, "variant") == ["2 single runs", "variations, 2-point grid"]
    assert column(table, "prepare-dataset runs") == ["2", "1"]
    separate, grid = (int(value) for value in column(table, "tokenize-shard runs"))
    assert separate == 2 * grid > 0


@pytest.mark.slow
def test_training_process(tmp_path, api_url):
    launch, ddp, grid = run_smoke(training_process, tmp_path, api_url)
    assert column(launch, "variant") == ["in the flow process", "own process (one device: no torchrun agent)"]
    assert column(ddp, "variant") == ["devices: 1", "devices: 2"] and column(ddp, "vs 1 device")[0] == "1.00x"
    assert column(grid, "variant") == ["1 device slot", "2 device slots"]
    assert all(RATIO.match(value) for value in column(grid, "wall ratio"))


@pytest.mark.slow
@pytest.mark.production
def test_server_database(tmp_path):
    """Two whole stacks of its own, SQLite and PostgreSQL (skipped when no PostgreSQL answers)."""
    (table,) = run_smoke(server_database, tmp_path, None)
    assert column(table, "variant") == ["sqlite", "postgresql"]
    assert column(table, "wall ratio")[0] == "1.00x" and all(RATIO.match(r) for r in column(table, "wall ratio"))
    assert all(float(value) > 0 for value in column(table, "runs/min"))
    assert all(float(value) >= 0 for value in column(table, "p95 to training s"))


def test_gpu_training_runs_its_path_on_the_cpu(tmp_path):
    results = tmp_path / "RESULTS.md"
    text = gpu_training.main(["--smoke", "--results", str(results)])
    assert text in results.read_text() and "| tokens/s | samples/s |" in text
    assert "n/a (no GPU)" in text or "TFLOP/s" in text
