"""The bad-input corpus: every case through the command line a user runs (`python flows/single.py
params.yaml`), asserting one clear error line (what, where, how to fix), a non-zero exit, no
training, an untouched registry and intact earlier outputs.

Most cases go through `run_from_command_line` in-process (the same function `flows/single.py`
calls, wired the same way), because a fresh interpreter costs ~8 s of imports per case; a few
representative cases run the real script in a subprocess against the session's Prefect server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from flows.cli import run_from_command_line
from flows.single import demo_params, single
from loraflow.config import SingleParams
from loraflow.data.prepare import prepare_dataset
from loraflow.plan import plan_run
from tests.tiny_models import build_tiny_llama, easy_classification_examples, tiny_corpus

REPO = Path(__file__).resolve().parents[1]
NAME = "reviews"
EARLIER_RESULT = b'{"status": "passed", "note": "an earlier good run"}\n'
EARLIER_INDEX = b'{"name": "reviews", "versions": [], "aliases": {}}\n'


def good_csv(path: Path) -> Path:
    rows = easy_classification_examples(30, seed=2)
    path.write_text("text,label\n" + "".join(f'"{r["text"]} {i}",{r["label"]}\n' for i, r in enumerate(rows)))
    return path


GOOD = lambda t: good_csv(t / "data.csv")  # noqa: E731


def jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def rows_json(n: int, label: Callable[[int], Any] = lambda i: ["a", "b", "c"][i % 3]) -> list[str]:
    return [json.dumps({"text": f"example number {i}", "label": label(i)}) for i in range(n)]


def not_a_model(tmp: Path) -> str:
    folder = tmp / "not-a-model"
    folder.mkdir()
    (folder / "weights.txt").write_text("hello")
    return str(folder)


def long_prompts(long: int, short: int) -> list[str]:
    """Prompt/completion rows, `long` of them with a prompt of 60 words: past max_length 32."""
    rows = [{"prompt": f"the cat {i} sat " + "on the red mat " * (15 if i < long else 1), "completion": "the dog."}
            for i in range(long + short)]
    return [json.dumps(row) for row in rows]


def causal_on_tiny_llama(tmp: Path) -> dict:
    return {"task": "causal-lm", "model": build_tiny_llama(tmp / "tiny-llama", tiny_corpus(40)),
            "dataset": {"prompt_column": "prompt", "completion_column": "completion"}}


def blocked_output(tmp: Path) -> str:
    (tmp / "a-file").write_text("in the way")
    return str(tmp / "a-file" / "runs")


# (case id, dataset writer, parameter changes, substrings of the error line, exit code)
# Exit 2: refused before the flow starts. Exit 1: the run started and failed in data preparation.
CASES: list[tuple[str, Callable[[Path], Path], Callable[[Path], dict], list[str], int]] = [
    ("missing-path", lambda t: t / "nope.csv", lambda t: {},
     ["nope.csv: dataset path does not exist", "check dataset.path"], 2),
    ("unknown-preset", GOOD, lambda t: {"preset": "classification-smal"},
     ["params.yaml: preset: unknown preset 'classification-smal'", "did you mean 'classification-small'?"], 2),
    ("unknown-override", GOOD, lambda t: {"overrides": {"learning_rat": 0.1}},
     ["params.yaml: overrides: unknown key 'learning_rat'", "did you mean 'learning_rate'?"], 2),
    ("zero-learning-rate", GOOD, lambda t: {"overrides": {"learning_rate": 0}},
     ["params.yaml: overrides.learning_rate: Input should be greater than 0"], 2),
    ("negative-learning-rate", GOOD, lambda t: {"overrides": {"learning_rate": -1e-4}},
     ["overrides.learning_rate: Input should be greater than 0"], 2),
    ("zero-epochs", GOOD, lambda t: {"overrides": {"num_epochs": 0}},
     ["overrides.num_epochs: Input should be greater than 0"], 2),
    ("negative-epochs", GOOD, lambda t: {"overrides": {"num_epochs": -2}},
     ["overrides.num_epochs: Input should be greater than 0"], 2),
    ("zero-batch-size", GOOD, lambda t: {"overrides": {"batch_size": 0}},
     ["overrides.batch_size: Input should be greater than or equal to 1"], 2),
    ("negative-batch-size", GOOD, lambda t: {"overrides": {"batch_size": -8}},
     ["overrides.batch_size: Input should be greater than or equal to 1"], 2),
    ("unknown-lora-targets", GOOD, lambda t: {"overrides": {"lora.target_modules": ["q_proj", "v_proj"]}},
     ["overrides.lora.target_modules: ['q_proj', 'v_proj'] not found", "'query'", "or use 'all-linear'"], 2),
    ("model-not-a-model", GOOD, lambda t: {"model": not_a_model(t)},
     ["model: ", "is not a model directory (no config.json)", "pass a `save_pretrained` folder"], 2),
    ("unknown-key", GOOD, lambda t: {"device": 2},
     ["params.yaml: device: unknown key (did you mean 'devices'?)"], 2),
    ("unknown-dataset-key", GOOD, lambda t: {"dataset": {"text_colum": "text"}},
     ["params.yaml: dataset.text_colum: unknown key (did you mean 'text_column'?)"], 2),
    ("multi-node-without-rendezvous", GOOD, lambda t: {"nnodes": 2},
     ["nnodes: 2 nodes need LORAFLOW_RDZV_ENDPOINT (host:port of the first node)"], 2),
    ("output-not-writable", GOOD, lambda t: {"output_dir": blocked_output(t)},
     ["output_dir: ", "cannot be written", "choose another output_dir"], 2),
    ("name-with-dotdot", GOOD, lambda t: {"dataset": {"name": "..reviews"}},
     ["params.yaml: dataset.name: dataset.name '..reviews' is not a safe folder name", "no '..'"], 2),
    ("name-with-slash", GOOD, lambda t: {"dataset": {"name": "team/reviews"}},
     ["params.yaml: dataset.name: dataset.name 'team/reviews' is not a safe folder name", "no '/'"], 2),
    ("empty-file", lambda t: _empty(t / "data.jsonl"), lambda t: {},
     ["data.jsonl: file is empty; remove it or add rows"], 1),
    ("header-only", lambda t: _write(t / "data.csv", "text,label\r\n"), lambda t: {},
     ["data.csv: CSV has a header but no data rows; add rows below the header"], 1),
    ("too-many-malformed-json-lines",
     lambda t: jsonl(t / "data.jsonl", rows_json(9) + ['{"text": "broken', "{not json}", "[1,", '{"text"'] * 3),
     lambda t: {}, ["data.jsonl: 12 of 21 rows rejected (57%; malformed_json: 12)",
                    "dataset.max_reject_fraction=0.5", "rejects.jsonl"], 1),
    ("only-malformed-json-lines", lambda t: jsonl(t / "data.jsonl", ['{"text": ', "nope"] * 3), lambda t: {},
     ["data.jsonl: no usable rows: all 6 rows were rejected (malformed_json: 6)", "rejects.jsonl"], 1),
    ("missing-text-column", lambda t: _write(t / "data.csv", "body,label\nhello there,a\n"), lambda t: {},
     ["data.csv: required column 'text' not found (columns: 'body', 'label')", "set dataset.text_column"], 1),
    ("missing-label-column", lambda t: jsonl(t / "data.jsonl", ['{"text": "hi", "category": "a"}'] * 4),
     lambda t: {}, ["data.jsonl: required column 'label' not found", "set dataset.label_column"], 1),
    ("mixed-label-types", lambda t: jsonl(t / "data.jsonl", rows_json(12, lambda i: i % 2 if i < 6 else "b")),
     lambda t: {}, ["data.jsonl:7: column 'label' mixes label types: int", "make every label the same type"], 1),
    ("class-too-small", lambda t: jsonl(t / "data.jsonl", rows_json(20, lambda i: "rare" if i == 19 else "ab"[i % 2])),
     lambda t: {}, ["data.jsonl:20: class 'rare' has only 1 example; every class needs at least 2"], 1),
    ("one-class", lambda t: jsonl(t / "data.jsonl", rows_json(12, lambda i: "a")), lambda t: {},
     ["data.jsonl: column 'label' (dataset.label_column) holds one class, 'a'; classification needs at least two"], 1),
    ("hub-id-typo", GOOD, lambda t: {"model": "minlm"},
     ["model: 'minlm' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
      "pass a local `save_pretrained` folder", "(did you mean 'minilm', the bundled offline MiniLM?)"], 2),
    ("prompt-fills-max-length", lambda t: jsonl(t / "data.jsonl", long_prompts(14, 6)), causal_on_tiny_llama,
     ["data.jsonl: 14 of 20 rows rejected (70%; prompt_fills_max_length: 14, when preparing: 0)",
      "tokenize-32.rejects.jsonl", "dataset.truncate_prompt: left"], 1),
    ("not-utf8", lambda t: _write_bytes(t / "data.jsonl", b'{"text": "caf\xe9 au lait", "label": "a"}\n' * 5),
     lambda t: {}, ["data.jsonl: no usable rows: all 5 rows were rejected (invalid_utf8: 5)"], 1),
    ("very-long-lines", lambda t: jsonl(t / "data.jsonl", [json.dumps({"text": "word " * 60_000, "label": "a"})] * 3),
     lambda t: {}, ["data.jsonl: no usable rows: all 3 rows were rejected (too_long: 3)"], 1),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_case(tmp_path: Path, make_data: Callable[[Path], Path], changes: Callable[[Path], dict]) -> tuple[Path, Path]:
    """The parameter file of a case, next to an output folder holding an earlier run's outputs."""
    output_dir = tmp_path / "runs"
    (output_dir / NAME).mkdir(parents=True)
    (output_dir / NAME / "result.json").write_bytes(EARLIER_RESULT)
    (output_dir / "registry" / NAME).mkdir(parents=True)
    (output_dir / "registry" / NAME / "index.json").write_bytes(EARLIER_INDEX)
    params: dict[str, Any] = {
        "dataset": {"path": str(make_data(tmp_path)), "name": NAME},
        "overrides": {"num_epochs": 1, "max_length": 32},
        "output_dir": str(output_dir),
    }
    for key, value in changes(tmp_path).items():
        params[key] = {**params[key], **value} if isinstance(value, dict) and key in params else value
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    return params_file, output_dir


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_nothing_trained_or_lost(tmp_path: Path, before: dict[str, bytes]) -> None:
    after = snapshot(tmp_path)
    changed = [path for path, data in before.items() if after.get(path) != data]
    assert not changed, f"earlier files changed or removed: {changed}"
    assert not list(tmp_path.rglob("adapter_model.safetensors")), "something was trained"
    registry = tmp_path / "runs" / "registry"
    assert sorted(p.relative_to(registry).as_posix() for p in registry.rglob("*")) == [NAME, f"{NAME}/index.json"]


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_gives_one_clear_line_and_changes_nothing(case, prefect_server, tmp_path, capfd):
    _, make_data, changes, expected, exit_code = case
    params_file, _ = write_case(tmp_path, make_data, changes)
    before = snapshot(tmp_path)
    capfd.readouterr()

    code = run_from_command_line(single, SingleParams, demo_params, argv=[str(params_file)], preflight=plan_run)

    line = last_line(capfd.readouterr().err)
    assert code == exit_code, line
    assert line.startswith("error: ") and "Traceback" not in line
    for fragment in expected:
        assert fragment in line, (fragment, line)
    assert_nothing_trained_or_lost(tmp_path, before)


@pytest.mark.parametrize("case_id", ["missing-path", "mixed-label-types"])
def test_the_real_script_prints_the_same_line(case_id, prefect_server, tmp_path):
    """One case refused before the flow starts and one that fails inside it, as a separate process."""
    from prefect.settings import PREFECT_API_URL

    _, make_data, changes, expected, exit_code = next(case for case in CASES if case[0] == case_id)
    params_file, _ = write_case(tmp_path, make_data, changes)
    before = snapshot(tmp_path)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}

    run = subprocess.run([sys.executable, str(REPO / "flows" / "single.py"), str(params_file)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=REPO)

    line = last_line(run.stderr)
    assert run.returncode == exit_code, run.stderr[-3000:]
    assert line.startswith("error: ") and all(fragment in line for fragment in expected), line
    assert_nothing_trained_or_lost(tmp_path, before)


def test_malformed_lines_under_the_bound_go_to_rejects_and_the_rest_is_used(tmp_path):
    data = jsonl(tmp_path / "data.jsonl", rows_json(30) + ['{"text": "broken', "plain words"])
    spec = SingleParams(dataset={"path": str(data), "max_reject_fraction": 0.1}).dataset

    prepared = prepare_dataset(spec, "sequence-classification", tmp_path / "out")

    assert prepared.counts["rejected"] == 2
    assert sum(prepared.counts[s] for s in ("train", "validation", "test")) == 30
    rejects = [json.loads(line) for line in Path(prepared.rejects_path).read_text().splitlines()]
    assert [(r["line"], r["kind"]) for r in rejects] == [(31, "malformed_json"), (32, "malformed_json")]


def test_a_bom_and_crlf_line_endings_just_work(tmp_path):
    rows = easy_classification_examples(30, seed=4)
    plain = tmp_path / "plain.csv"
    plain.write_text("text,label\n" + "".join(f'{r["text"]} {i},{r["label"]}\n' for i, r in enumerate(rows)))
    windows = tmp_path / "windows.csv"
    windows.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", b"\r\n"))
    prepared = [
        prepare_dataset(SingleParams(dataset={"path": str(path), "name": "same"}).dataset,
                        "sequence-classification", tmp_path / path.stem)
        for path in (plain, windows)
    ]
    assert prepared[0].fingerprint == prepared[1].fingerprint and prepared[0].counts["rejected"] == 0
