"""The pipeline is said once (`loraflow.pipeline`): a stage added to its list, with its core
function, runs in the flow, shows in the plan and in the benchmarks' plain pipeline, with no edit
to any of them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import common as bench
from flows.single import single
from loraflow import pipeline
from loraflow.data.prepare import PreparedDataset
from loraflow.dry_run import CACHED, WILL_RUN
from loraflow.pipeline import DATA_STAGES, TRAINING_STAGES, Stage, fingerprint_key
from tests.test_flow_single import FAST_CLASSIFICATION, classification_params


def data_quality_report(prepared: PreparedDataset, out_path: Path) -> str:
    """A stage only this test knows: rows and label counts per split, as JSON."""
    report = {}
    for split, path in prepared.splits.items():
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        report[split] = {"rows": len(rows), "labels": dict(Counter(str(row.get("label")) for row in rows))}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report))
    return str(out_path)


QUALITY = Stage(
    name="quality", output="quality_report", function=data_quality_report,
    arguments=lambda run: {"prepared": run["prepared"], "out_path": run.data_plan.layout.data / "quality.json"},
    cache_key=lambda arguments: fingerprint_key("quality", arguments["prepared"].fingerprint,
                                                str(arguments["out_path"])),
)


@pytest.fixture
def quality_stage():
    """The one entry: after preparation, before tokenisation."""
    DATA_STAGES.insert(1, QUALITY)
    try:
        yield QUALITY
    finally:
        DATA_STAGES.remove(QUALITY)


def test_the_stage_lists_name_every_stage_once_in_pipeline_order():
    assert [stage.name for stage in (*DATA_STAGES, *TRAINING_STAGES)] == [
        "prepare", "tokenize", "baseline", "train", "evaluate", "samples", "champion", "export", "register"]
    assert len({stage.output for stage in (*DATA_STAGES, *TRAINING_STAGES)}) == 9


def test_a_stage_added_to_the_list_runs_in_the_flow_the_plan_and_the_plain_pipeline(
        prefect_server, tmp_path, quality_stage):
    params = classification_params(tmp_path, overrides={**FAST_CLASSIFICATION, "num_epochs": 1}, gates={})
    report_path = tmp_path / "runs" / "reviews" / "data" / "quality.json"

    before = single(params.model_copy(update={"plan_only": True}), return_state=True).result()
    assert list(before.datasets[0].stages) == ["prepare", "quality", "tokenize", "baseline"]
    assert before.datasets[0].stages["quality"] == WILL_RUN and not report_path.exists()

    result = single(params, return_state=True).result()
    assert result.cached["quality"] is False and result.timings["quality"] >= 0
    written = json.loads(report_path.read_text())
    assert sum(split["rows"] for split in written.values()) == sum(
        count for split, count in result.counts.items() if split != "rejected")

    after = single(params.model_copy(update={"plan_only": True}), return_state=True).result()
    assert after.datasets[0].stages["quality"] == CACHED
    again = single(params, return_state=True).result()
    assert again.cached["quality"] is True and again.cached["train"] is True

    timed = bench.Stopwatch()
    elsewhere = params.model_copy(update={"output_dir": str(tmp_path / "plain")})
    plain = bench.prepare_pipeline(elsewhere.model_dump(mode="json"), timed)
    assert list(timed.timings) == ["prepare", "quality", "tokenize"]
    assert Path(plain["quality_report"]).is_file()
    assert pipeline.DATA_STAGES[1] is quality_stage
