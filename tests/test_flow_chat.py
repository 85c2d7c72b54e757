"""`task: chat` through the `single` flow: OpenAI (with a role mapping), ShareGPT and Alpaca files on a
tiny local Llama with a template it never had (`chatml`), scored against the base model by perplexity,
exact match and ROUGE-L, and exported merged."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows.batch import batch
from flows.single import single
from flows.variations import variations
from loraflow.chat import CHATML
from loraflow.config import BatchParams, SingleParams, VariationsParams
from loraflow.errors import ConfigError
from loraflow.layout import read_jsonl
from loraflow.plan import plan_run
from loraflow.registry import Registry
from tests.tiny_models import build_tiny_llama, chat_conversations, tiny_corpus


def write_three_forms(folder: Path) -> Path:
    """The conversations as a folder of OpenAI (with the role name `bot`), ShareGPT and Alpaca files."""
    folder.mkdir()
    rows = chat_conversations()
    (folder / "a.jsonl").write_text("".join(json.dumps({"messages": [
        row["messages"][0], {"role": "bot", "content": row["messages"][1]["content"]}]}) + "\n" for row in rows[:12]))
    (folder / "b.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": row["messages"][0]["content"]},
        {"from": "gpt", "value": row["messages"][1]["content"]}]} for row in rows[12:24]]))
    alpaca = {"instruction": [row["messages"][0]["content"] for row in rows[24:]],
              "output": [row["messages"][1]["content"] for row in rows[24:]]}
    pq.write_table(pa.table(alpaca), folder / "c.parquet")
    return folder


def chat_params(tmp_path: Path, **changes) -> SingleParams:
    answers = [row["messages"][1]["content"] for row in chat_conversations()]
    model_dir = build_tiny_llama(tmp_path / "tiny-llama", tiny_corpus() + answers, initializer_range=0.3)
    params = {
        "dataset": {"path": str(write_three_forms(tmp_path / "chats")), "test_fraction": 0.2,
                    "roles": {"bot": "assistant"}},
        "task": "chat",
        "model": model_dir,
        "chat_template": "chatml",
        "overrides": {"num_epochs": 12, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 0.02,
                      "max_length": 96, "save_steps": 1000, "max_new_tokens": 12},
        "gates": {"rouge_l": 0.3, "perplexity": 1e6},
        "output_dir": str(tmp_path / "runs"),
        **changes,
    }
    return SingleParams(**params)


def test_a_model_without_a_chat_template_is_refused_before_any_work(tmp_path):
    params = chat_params(tmp_path, chat_template=None)
    with pytest.raises(ConfigError, match="^chat_template: model 'tiny-llama' has no chat template"):
        plan_run(params)
    assert not Path(params.output_dir).exists()


def test_chat_on_a_local_tiny_llama(prefect_server, tmp_path):
    state = single(chat_params(tmp_path, export="merged"), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert {"perplexity", "eval_loss", "exact_match", "rouge_l"} <= set(result.metrics) & set(result.baseline)
    assert result.counts["rejected"] == 0 and sum(result.counts[s] for s in ("train", "validation", "test")) == 36
    assert result.metrics["rouge_l"] > result.baseline["rouge_l"] and result.gates["rouge_l"].passed
    assert result.metrics["perplexity"] < result.baseline["perplexity"]
    assert AutoTokenizer.from_pretrained(result.adapter_path).chat_template == CHATML
    merged = AutoModelForCausalLM.from_pretrained(result.paths["merged"])
    assert Path(result.paths["merged"]) == Path(tmp_path / "runs" / "chats" / "merged").resolve()
    tokenizer = AutoTokenizer.from_pretrained(result.paths["merged"])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "where did the red cat sit?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert merged.generate(**prompt, max_new_tokens=4, do_sample=False).shape[1] > prompt["input_ids"].shape[1]
    [first, *_] = read_jsonl(Path(result.paths["result"]).parent / "samples" / "generations.jsonl")
    assert set(first) == {"prompt", "reference", "base", "adapter"}
    assert first["prompt"].startswith(("where", "tell", "the")) and first["reference"].startswith("the ")
    assert "report" in result.paths  # report.html shows the chat samples
    samples = [json.loads(line) for line in Path(result.paths["samples"]).read_text().splitlines()]
    assert samples and all(sample["reference"].startswith("the ") and "generated" in sample for sample in samples)


def test_a_chat_plan_counts_templated_tokens_and_steps_over_packed_rows(prefect_server, tmp_path):
    params = chat_params(tmp_path, plan_only=True, packing=True, overrides={
        "num_epochs": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 256})
    plan = single(params)
    [dataset], [run] = plan.datasets, plan.runs
    tokenizer = AutoTokenizer.from_pretrained(params.model)
    train = read_jsonl(Path(dataset.data_dir) / "train.jsonl")
    lengths = [len(tokenizer.apply_chat_template(row["messages"], chat_template=CHATML, tokenize=True,
                                                 return_dict=True)["input_ids"]) for row in train]
    assert (run.templated.conversations, run.templated.tokens, run.templated.longest, run.templated.too_long) == (
        dataset.counts["train"], sum(lengths), max(lengths), 0)
    assert 0 < run.templated.packed_rows < dataset.counts["train"] / 2  # conversations of under 90 tokens in 256-token rows
    assert run.steps == 2 * math.ceil(run.templated.packed_rows / 2)
    assert f"chat: {sum(lengths):,} templated tokens in {len(train)} train conversations" in plan.text()


FAST_CHAT = {"num_epochs": 3, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 0.02,
             "max_length": 96, "save_steps": 1000, "max_new_tokens": 12}


def test_chat_in_a_batch_registers_each_dataset_with_its_merged_export(prefect_server, tmp_path):
    single_params = chat_params(tmp_path)
    rows = chat_conversations()
    folder = tmp_path / "two"
    folder.mkdir()
    openai = folder / "openai.jsonl"
    openai.write_text("".join(json.dumps(row) + "\n" for row in rows[:18]))
    sharegpt = folder / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": row["messages"][0]["content"]},
                                                       {"from": "gpt", "value": row["messages"][1]["content"]}]}
                                    for row in rows[18:]]))
    params = BatchParams(datasets=[{"path": str(path), "test_fraction": 0.25} for path in (openai, sharegpt)],
                         task="chat", model=single_params.model, chat_template="chatml", export="merged",
                         overrides=FAST_CHAT, gates={"perplexity": 1e6}, output_dir=str(tmp_path / "runs"))
    state = batch(params, return_state=True)
    assert state.is_completed(), state.message
    entries = {entry["name"]: entry for entry in
               json.loads((Path(params.output_dir) / "batch" / "batch_result.json").read_text())["datasets"]}
    assert set(entries) == {"openai", "sharegpt"}
    registry = Registry(params.registry_root)
    for name, entry in entries.items():
        assert entry["status"] == "passed" and {"exact_match", "rouge_l", "perplexity"} <= set(entry["metrics"])
        merged = Path(params.output_dir).resolve() / name / "merged"
        assert (merged / "model.safetensors").is_file()
        version = registry.resolve(name, "production")
        assert version.verdicts[-1].merged == str(merged) and version.version == entry["registry_version"]


def test_chat_variations_rank_by_rouge_l(prefect_server, tmp_path):
    single_params = chat_params(tmp_path)
    params = VariationsParams(**{**single_params.model_dump(exclude={"overrides", "gates"}), "overrides": FAST_CHAT,
                                 "grid": {"learning_rate": [0.002, 0.02]}, "metric": "rouge_l",
                                 "gates": {"perplexity": 1e6}, "export": "merged"})
    state = variations(params, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    scores = [outcome.metrics["rouge_l"] for outcome in result.leaderboard]
    assert result.metric == "rouge_l" and len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert all({"exact_match", "perplexity"} <= set(outcome.metrics) for outcome in result.leaderboard)
    with open(Path(result.paths["leaderboard"]), newline="") as handle:
        board = list(csv.DictReader(handle))
    assert [row["name"] for row in board] == [outcome.name for outcome in result.leaderboard]
    best = Registry(params.registry_root).resolve("chats", "best")
    assert result.best == board[0]["name"] and best.version == 1 and board[0]["registry_version"] == "1"
    assert best.verdicts[-1].merged == result.leaderboard[0].merged_path, "the winner's merged export is on record"
    assert (Path(result.leaderboard[0].merged_path) / "model.safetensors").is_file()
