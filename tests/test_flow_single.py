"""The `single` flow end to end under a real Prefect server: MiniLM classification on a
messy CSV, a cached identical re-run, failing gates, resume, and causal-LM on a tiny Llama."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from flows.single import single
from loraflow.config import SingleParams
from loraflow.registry import Registry
from tests.tiny_models import (
    EASY_LABELS,
    build_tiny_llama,
    easy_classification_examples,
    tiny_corpus,
)

REPO = Path(__file__).resolve().parents[1]
FAST_CLASSIFICATION = {"num_epochs": 4, "learning_rate": 0.005, "save_steps": 10, "batch_size": 8, "max_length": 32}


def write_messy_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """What real exports look like: a BOM, CRLF endings, quoted commas and an extra id column."""
    lines = ["id,text,label"]
    for number, row in enumerate(rows, start=1):
        text = row["text"].replace('"', "'")
        lines.append(f'{number},"{text}, truly",{row["label"]}')
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    return path


def classification_params(tmp_path: Path, **changes) -> SingleParams:
    data = write_messy_csv(tmp_path / "reviews.csv", easy_classification_examples(90, seed=1))
    params = {
        "dataset": {"path": str(data)},
        "overrides": FAST_CLASSIFICATION,
        "gates": {"accuracy": 0.8},
        "output_dir": str(tmp_path / "runs"),
        "shard_size": 40,
        **changes,
    }
    return SingleParams(**params)


@pytest.fixture(scope="module")
def first_and_second_run(prefect_server, tmp_path_factory):
    """Two identical runs of the classification pipeline (shared by several tests: training costs)."""
    tmp_path = tmp_path_factory.mktemp("classification")
    params = classification_params(tmp_path)
    first = single(params, return_state=True)
    second = single(params, return_state=True)
    return params, first, second


def test_classification_trains_evaluates_and_registers(first_and_second_run):
    params, first, _ = first_and_second_run
    assert first.is_completed(), first.message
    result = first.result()
    root = Path(params.output_dir) / "reviews"
    on_disk = json.loads((root / "result.json").read_text())
    assert on_disk["status"] == "passed" and on_disk["passed"] is True
    assert result.metrics["accuracy"] >= 0.8 > result.baseline["accuracy"]
    assert set(result.metrics) >= {"accuracy", "f1_macro", "precision", "recall", "confusion_matrix"}
    assert on_disk["gates"]["accuracy"] == {
        "metric": "accuracy", "threshold": 0.8, "value": result.metrics["accuracy"],
        "higher_is_better": True, "passed": True, "severity": "critical", "profile": None,
    }
    for name in ("adapter_model.safetensors", "adapter_config.json", "label_map.json", "tokenizer.json"):
        assert (root / "model" / name).is_file(), name
    for sub in ("data/manifest.json", "data/rejects.jsonl", "config/resolved.yaml", "eval/metrics.json",
                "eval/baseline.json", "samples/predictions.jsonl", "logs/metrics.jsonl"):
        assert (root / sub).is_file(), sub
    pictures = {key: on_disk["paths"].get(key) for key in ("loss_curve", "confusion_matrix")}
    assert pictures == {"loss_curve": str(root / "logs" / "loss.png"),  # drawn without any tracker asked for
                        "confusion_matrix": str(root / "eval" / "confusion_matrix.png")}
    assert all(Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in pictures.values())
    predictions = [json.loads(line) for line in (root / "samples/predictions.jsonl").read_text().splitlines()]
    assert predictions and all(p["predicted"] in EASY_LABELS for p in predictions)
    assert set(on_disk["timings"]) == {"prepare", "tokenize", "train", "evaluate", "baseline", "samples", "register"}
    assert not any(result.cached.values())  # result.json on disk is the second (cached) run's by now
    assert result.registry_version == 1
    assert Registry(params.registry_root).resolve("reviews", "production").version == 1


def test_identical_rerun_is_served_from_cache(first_and_second_run):
    params, first, second = first_and_second_run
    assert second.is_completed(), second.message
    cached = second.result()
    assert all(cached.cached.values()), cached.cached
    assert cached.metrics == first.result().metrics
    assert cached.timings["train"] < 0.25 * first.result().timings["train"]
    assert [v.version for v in Registry(params.registry_root).index("reviews").versions] == [1]


def test_deleted_outputs_are_rebuilt_and_training_resumes_from_its_checkpoint(first_and_second_run):
    """A cache hit naming deleted files recomputes; the trainer resumes from the last checkpoint."""
    params, _, _ = first_and_second_run
    root = Path(params.output_dir) / "reviews"
    for path in (root / "model").iterdir():
        path.unlink()
    (root / "model").rmdir()
    state = single(params, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result.cached["train"] is False and result.train["resumed_from_step"] is not None
    assert (root / "model" / "adapter_model.safetensors").is_file()
    assert [v.version for v in Registry(params.registry_root).index("reviews").versions] == [1]


def test_failing_gates_fail_the_run_after_writing_everything(prefect_server, tmp_path):
    params = classification_params(tmp_path, gates={"accuracy": 1.01}, overrides={**FAST_CLASSIFICATION, "num_epochs": 1})
    state = single(params, return_state=True)
    assert state.is_failed()
    assert "accuracy" in state.message and ">= 1.01 FAIL" in state.message
    result = json.loads((Path(params.output_dir) / "reviews" / "result.json").read_text())
    assert result["status"] == "failed_gates" and result["gates"]["accuracy"]["passed"] is False
    assert (Path(params.output_dir) / "reviews" / "model" / "adapter_model.safetensors").is_file()
    assert "production" not in Registry(params.registry_root).index("reviews").aliases


def test_the_result_and_the_summary_say_which_classes_the_test_split_lacks(prefect_server, tmp_path):
    """A class whose few rows all land in train is not scored: result.json, the summary and the report say so;
    the summary also counts the rows left out (an empty label)."""
    import hashlib

    from loraflow.report import summary_text

    def position(text: str) -> float:  # where the split puts a row: its normalised text's sha256, in [0, 1)
        return int.from_bytes(hashlib.sha256(f"{text}, truly".encode()).digest()[:8], "big") / 2**64

    train_only = [t for t in (f"a rare complaint number {i}" for i in range(100)) if position(t) >= 0.5][:3]
    rows = easy_classification_examples(90, seed=1) + [{"text": t, "label": "scarce"} for t in train_only]
    rows.append({"text": "a row whose label was left empty", "label": ""})
    data = write_messy_csv(tmp_path / "reviews.csv", rows)
    params = SingleParams(dataset={"path": str(data)}, overrides={**FAST_CLASSIFICATION, "num_epochs": 1},
                          output_dir=str(tmp_path / "runs"), shard_size=200)
    state = single(params, return_state=True)
    assert state.is_completed(), state.message
    root = Path(params.output_dir) / "reviews"
    on_disk = json.loads((root / "result.json").read_text())
    assert on_disk["classes_missing"] == {"validation": ["scarce"], "test": ["scarce"]}
    lacks = (f"{data}: the test split has no rows of class(es) 'scarce' (3 in all): test metrics cannot score them; "
             "add examples of them or raise dataset.test_fraction")
    assert lacks in on_disk["data_warnings"]
    summary = summary_text(state.result()).splitlines()
    assert f"  warning: {lacks}" in summary
    rejects = [json.loads(line) for line in (root / "data" / "rejects.jsonl").read_text().splitlines()]
    assert any("empty or missing 'label'" in reject["reason"] for reject in rejects)  # besides the duplicates
    assert f"  rejected: {len(rejects)} row(s) left out, reasons in {root / 'data' / 'rejects.jsonl'}" in summary
    assert "<h2>Data warnings</h2>" in (root / "report.html").read_text() and "&#x27;scarce&#x27;" in (
        root / "report.html").read_text()


def test_causal_lm_on_a_local_tiny_llama(prefect_server, tmp_path):
    corpus = sorted(set(tiny_corpus(200, seed=3)))[:60]
    model_dir = build_tiny_llama(tmp_path / "tiny-llama", corpus)
    rows = [{"instruction": f"Line {i}: {' '.join(t.split()[:3])}", "answer": " ".join(t.split()[3:])}
            for i, t in enumerate(corpus)]
    data = tmp_path / "instructions.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    params = SingleParams(
        dataset={"path": str(data), "prompt_column": "instruction", "completion_column": "answer",
                 "test_fraction": 0.2},
        task="causal-lm",
        model=model_dir,
        overrides={"num_epochs": 3, "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 0.01,
                   "max_length": 48, "save_steps": 10, "max_new_tokens": 8},
        gates={"perplexity": 1e6},
        output_dir=str(tmp_path / "runs"),
    )
    state = single(params, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result.metrics["eval_loss"] < result.baseline["eval_loss"]
    assert result.metrics["perplexity"] < result.baseline["perplexity"]
    samples = Path(result.paths["samples"]).read_text().splitlines()
    assert samples and all("generated" in json.loads(line) for line in samples)


def test_command_line_rejects_a_bad_parameter_file_in_one_line(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("dataset:\n  path: data.csv\noverrides:\n  lora.rank: 4\n")
    run = subprocess.run(
        [sys.executable, str(REPO / "flows" / "single.py"), str(params_file)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {params_file}: overrides: unknown key 'lora.rank' (did you mean 'lora.r'?)"


def test_shuffled_rows_keep_their_split(tmp_path):
    """Guard for the cache story: the same rows in another order prepare to the same data."""
    from loraflow.data.prepare import prepare_dataset

    rows = easy_classification_examples(60, seed=5)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    fingerprints = []
    for name, ordering in (("a", rows), ("b", shuffled)):
        spec = SingleParams(dataset={"path": str(write_messy_csv(tmp_path / f"{name}.csv", ordering))}).dataset
        fingerprints.append(prepare_dataset(spec, "sequence-classification", tmp_path / name).counts)
    assert fingerprints[0] == fingerprints[1]


def test_tokenisation_starts_a_dask_cluster_only_for_shards_still_to_tokenise(tmp_path):
    """A re-run finds every shard file and only looks them up: a cluster would cost more than that."""
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from loraflow.data.tokenize import split_into_shards, tokenize_shard
    from loraflow.pipeline import DATA_STAGES, PipelineRun
    from loraflow.plan import plan_run
    from tasks.stage_tasks import shard_runner

    params = classification_params(tmp_path)
    prepare, tokenize = DATA_STAGES[0], DATA_STAGES[1]
    run = PipelineRun(plan_run(params))
    run.outputs["prepared"] = prepare.function(**prepare.arguments(run))
    arguments = tokenize.arguments(run)
    max_length = run.config.settings.max_length
    assert isinstance(shard_runner(arguments, max_length), DaskTaskRunner)
    shards = split_into_shards(run["prepared"], params.shard_size)
    for shard in shards[:-1]:
        tokenize_shard(shard, run.plan.model_path, params.task, max_length, run.tokens_dir)
    assert isinstance(shard_runner(arguments, max_length), DaskTaskRunner)  # one shard left
    tokenize_shard(shards[-1], run.plan.model_path, params.task, max_length, run.tokens_dir)
    assert isinstance(shard_runner(arguments, max_length), ThreadPoolTaskRunner)
