"""task: chat: conversation rows in three forms, every reject reason, chat templates, and the loss mask."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.chat_template_utils import qwen2_5_chat_template

from loraflow.chat import CHATML, ChatEncoding, resolve_chat_template
from loraflow.chat_eval import GenerationEval, _before_stop
from loraflow.config import DatasetSpec, SingleParams
from loraflow.data.prepare import prepare_dataset
from loraflow.data.tokenize import (
    IGNORE_INDEX,
    collect_rejects,
    load_tokenizer,
    split_into_shards,
    tokenize_shard,
)
from loraflow.errors import ConfigError, DataError
from loraflow.evaluate import evaluate_model
from loraflow.export import export_merged
from loraflow.layout import read_jsonl
from loraflow.plan import plan_run
from loraflow.settings import resolve_training_settings
from loraflow.train.request import TrainRequest
from loraflow.train.trainer import train_adapter
from tests.tiny_models import build_tiny_llama, chat_conversations, tiny_corpus

CHAT_CORPUS = tiny_corpus() + ["where did it sit? tell me where it sat.", "system user assistant"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("chat-llama"), CHAT_CORPUS, chat_template=CHATML)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def prepare(tmp_path: Path, path: Path, **spec):
    return prepare_dataset(DatasetSpec(path=str(path), max_reject_fraction=0.9, **spec), "chat", tmp_path / "out")


def split_rows(prepared) -> list[dict]:
    return [row for split in ("train", "validation", "test") for row in read_jsonl(prepared.splits[split])]


def test_openai_sharegpt_alpaca_and_role_mapping_read_as_one_messages_form(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a_openai.jsonl", chat_conversations(12))
    sharegpt = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": f"q {i}"},
                                   {"from": "gpt", "value": f"a {i}"}]} for i in range(12)]
    (folder / "b_sharegpt.json").write_text(json.dumps(sharegpt), encoding="utf-8")
    alpaca = {"instruction": [f"do {i}" for i in range(12)], "input": ["" if i % 2 else f"x{i}" for i in range(12)],
              "output": [f"done {i}" for i in range(12)]}
    pq.write_table(pa.table(alpaca), folder / "c_alpaca.parquet")
    prepared = prepare(tmp_path, folder, system_prompt="you help")
    rows = split_rows(prepared)
    assert len(rows) == 36 and prepared.counts["rejected"] == 0
    by_first_user = {row["messages"][1]["content"]: row["messages"] for row in rows}
    assert by_first_user["q 3"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q 3"},
                                    {"role": "assistant", "content": "a 3"}]
    assert by_first_user["do 0\n\nx0"][0] == {"role": "system", "content": "you help"}  # the default system prompt
    assert by_first_user["do 1"][2] == {"role": "assistant", "content": "done 1"}
    assert rows[0]["source"][0].startswith(("a_", "b_", "c_"))

    custom = write_jsonl(tmp_path / "custom.jsonl", [
        {"dialog": [{"role": "human", "content": f"hi {i}"}, {"role": "bot", "content": f"yo {i}"}]} for i in range(8)])
    mapped = split_rows(prepare(tmp_path, custom, messages_column="dialog", roles={"bot": "assistant"}))
    assert {row["messages"][1]["role"] for row in mapped} == {"assistant"} and len(mapped) == 8


BAD_ROWS = [
    ({"messages": "hello"}, "not_a_list"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}, "empty_content"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "user", "content": "q"}, {"role": "assistant", "content": "y"}]}, "two_system_turns"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y"},
                   {"role": "system", "content": "late"}]}, "two_system_turns"),
    ({"messages": ["not an object"]}, "bad_message"),
]


def test_every_malformed_conversation_goes_to_rejects_with_its_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_conversations(20) + [row for row, _ in BAD_ROWS])
    prepared = prepare(tmp_path, path)
    rejects = read_jsonl(prepared.rejects_path)
    assert [(r["line"], r["kind"]) for r in rejects] == [(21 + i, kind) for i, (_, kind) in enumerate(BAD_ROWS)]
    assert rejects[1]["reason"].startswith("message 1 has unknown role 'wizard'; map it with dataset.roles")


def test_a_file_without_a_conversation_column_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}] * 3)
    with pytest.raises(DataError, match=r"d.jsonl: no conversation column \(columns: 'text'\); expected 'messages'"):
        prepare(tmp_path, path)


def test_chat_template_named_jinja_or_file_and_a_model_without_one_is_refused(tmp_path, chat_model):
    assert resolve_chat_template(chat_model, None) == CHATML  # the model's own
    plain = build_tiny_llama(tmp_path / "plain", CHAT_CORPUS)
    assert resolve_chat_template(plain, "chatml") == CHATML
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert resolve_chat_template(plain, str(tmp_path / "t.jinja")) == "{{ messages[0]['content'] }}"
    with pytest.raises(ConfigError, match=r"^chat_template: model 'plain' has no chat template; set chat_template"):
        resolve_chat_template(plain, None)
    with pytest.raises(ValueError, match="did you mean 'chatml'"):
        SingleParams(task="chat", dataset={"path": "x.jsonl"}, chat_template="chatm1")


def tokenize_chat(tmp_path: Path, model: str, rows: list, template: str, train_on: str, max_length: int = 64):
    tmp_path.mkdir(exist_ok=True)
    prepared = prepare(tmp_path, write_jsonl(tmp_path / "c.jsonl", rows), test_fraction=0.4, validation_fraction=0.0)
    shards = split_into_shards(prepared, 1000, ChatEncoding(template=template, train_on=train_on))
    paths = [tokenize_shard(shard, model, "chat", max_length, tmp_path / "tokens") for shard in shards]
    return prepared, paths, [row for path in paths for row in pq.read_table(path).to_pylist()]


def learned_text(tokenizer, row: dict) -> list[str]:
    """The unmasked label tokens, decoded run by run, without the newlines a template may put around a turn
    (TRL's training templates count the one after `assistant` as the turn's)."""
    runs, current = [], []
    for token in row["labels"]:
        if token == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token)
    return [tokenizer.decode(run).strip("\n") for run in runs + ([current] if current else [])]


TWO_TURNS = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"the {w} cat?"},
                           {"role": "assistant", "content": f"sat on the {w} mat."},
                           {"role": "user", "content": "dog?"}, {"role": "assistant", "content": f"the {w} dog sat."}]}
             for w in ("red", "blue", "green", "black", "big", "small", "old", "new", "wet", "dry")]
NO_MARKERS = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.mark.parametrize("template", [CHATML, NO_MARKERS, qwen2_5_chat_template],
                         ids=["generation-markers", "prefix-rendering", "trl-training-template"])
def test_labels_are_exactly_the_assistant_turns_with_their_end_of_turn(tmp_path, chat_model, template):
    tokenizer = load_tokenizer(chat_model)
    for train_on, expected in (("assistant", ["sat on the {w} mat.<|im_end|>", "the {w} dog sat.<|im_end|>"]),
                               ("last", ["the {w} dog sat.<|im_end|>"])):
        _, _, rows = tokenize_chat(tmp_path / train_on, chat_model, TWO_TURNS, template, train_on)
        for row in rows:
            word = tokenizer.decode(row["input_ids"]).split("the ")[1].split(" ")[0]
            assert learned_text(tokenizer, row) == [text.format(w=word) for text in expected]
    _, _, rows = tokenize_chat(tmp_path / "all", chat_model, TWO_TURNS, template, "all")
    assert all(row["labels"] == row["input_ids"] for row in rows)


def test_a_conversation_too_long_after_templating_goes_to_the_tokenize_rejects(tmp_path, chat_model):
    long = {"messages": [{"role": "user", "content": "where " * 100}, {"role": "assistant", "content": "here"}]}
    prepared, paths, rows = tokenize_chat(tmp_path, chat_model, TWO_TURNS + [long], CHATML, "assistant", max_length=80)
    assert len(rows) == len(TWO_TURNS)
    rejects_path, count = collect_rejects(prepared, paths, 80)
    [reject] = read_jsonl(rejects_path)
    assert (reject["line"], reject["kind"], count) == (len(TWO_TURNS) + 1, "too_long_for_max_length", 1)
    assert reject["reason"].startswith("conversation has ") and "more than max_length=80" in reject["reason"]


@pytest.fixture(scope="module")
def trained_chat(tmp_path_factory) -> dict:
    """A chat adapter on a model without a template, given `chatml`: trained once for the tests below."""
    tmp_path = tmp_path_factory.mktemp("trained-chat")
    answers = [row["messages"][1]["content"] for row in chat_conversations()]
    model_path = build_tiny_llama(tmp_path / "base", CHAT_CORPUS + answers, initializer_range=0.3)
    template = resolve_chat_template(model_path, "chatml")
    prepared = prepare(tmp_path, write_jsonl(tmp_path / "chat.jsonl", chat_conversations()), test_fraction=0.2)
    paths = [tokenize_shard(shard, model_path, "chat", 96, tmp_path / "tokens")
             for shard in split_into_shards(prepared, 1000, ChatEncoding(template=template))]
    shards = {split: [p for p in paths if Path(p).name.startswith(split)] for split in ("train", "test")}
    settings = resolve_training_settings("chat-llama", {
        "learning_rate": 2e-2, "num_epochs": 12, "batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 96,
        "save_steps": 1000, "logging_steps": 50, "max_new_tokens": 12}, "chat")
    assert settings.lora.target_modules == "all-linear"
    request = TrainRequest(
        model_path=model_path, task="chat", settings=settings, labels=None, train_shards=shards["train"],
        eval_shards=[], checkpoint_dir=str(tmp_path / "ckpt"), adapter_dir=str(tmp_path / "model"),
        logs_dir=str(tmp_path / "logs"), chat_template=template,
    )
    adapter_dir = train_adapter(request, log=lambda message: None).adapter_dir
    return {"model": model_path, "adapter": adapter_dir, "template": template, "test_rows": prepared.splits["test"],
            "test_shards": shards["test"], "root": tmp_path}


def test_chat_adapter_keeps_its_template_and_beats_the_base_at_answering(trained_chat):
    """The adapter's tokenizer keeps `chatml`, and the adapter answers the held-out questions better
    than the base (ROUGE-L), with a lower loss on the assistant tokens."""
    template = trained_chat["template"]
    assert AutoTokenizer.from_pretrained(trained_chat["adapter"]).chat_template == template
    generation = GenerationEval(conversations_path=trained_chat["test_rows"], template=template, max_new_tokens=12,
                                max_length=96)
    base, tuned = (evaluate_model(trained_chat["model"], "chat", None, trained_chat["test_shards"], adapter,
                                  generation=generation) for adapter in (None, trained_chat["adapter"]))
    assert tuned["eval_loss"] < base["eval_loss"] - 1.0, (base["eval_loss"], tuned["eval_loss"])
    assert tuned["rouge_l"] > base["rouge_l"] + 0.3, (base["rouge_l"], tuned["rouge_l"], tuned["generations"][:3])
    assert 0.0 <= base["exact_match"] <= tuned["exact_match"] <= 1.0
    sample = tuned["generations"][0]
    assert sample["prompt"].startswith(("where", "tell", "the")) and sample["reference"].startswith("the ")


def test_merged_export_loads_plainly_and_gives_the_adapter_s_logits(trained_chat):
    merged = export_merged(trained_chat["model"], trained_chat["adapter"], trained_chat["root"] / "merged")
    assert not list(Path(merged).glob("adapter_*")) and list(Path(merged).glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template == trained_chat["template"]
    ids = torch.tensor([tokenizer("<|im_start|>user\nwhere did the red cat sit?")["input_ids"]])
    with torch.inference_mode():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained_chat["model"]),
                                            trained_chat["adapter"]).eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    assert torch.allclose(plain, adapted, atol=1e-4), (plain - adapted).abs().max()


def test_answers_stop_at_the_end_of_turn_even_when_cut_inside_it():
    assert _before_stop("the cat sat.<|im_end|>\nmore", "<|im_end|>") == "the cat sat."
    assert _before_stop("the cat sat.<|im", "<|im_end|>") == "the cat sat."
    assert _before_stop("a < b", "<|im_end|>") == "a < b"


def test_quantized_training_on_a_host_without_cuda_is_refused_in_the_parameter_check(tmp_path, chat_model):
    params = SingleParams(task="chat", model=chat_model, dataset={"path": str(write_jsonl(tmp_path / "c.jsonl", [{}]))},
                          quantization="4bit", output_dir=str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match=r"^quantization: 4bit needs (bitsandbytes|a CUDA GPU)"):
        plan_run(params)
    with pytest.raises(ValueError, match="quantization: 8bit needs a causal-LM task"):
        SingleParams(dataset={"path": "x.csv"}, quantization="8bit")
