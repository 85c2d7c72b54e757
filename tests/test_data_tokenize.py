"""Tokenisation shards: planning covers every row once; parquet schema, truncation, masking, eos."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loraflow.config import DatasetSpec
from loraflow.data.prepare import SPLITS, PreparedDataset, causal_prompt_text, prepare_dataset
from loraflow.data.tokenize import (
    IGNORE_INDEX,
    Shard,
    collect_rejects,
    load_tokenizer,
    shard_paths_by_split,
    split_into_shards,
    tokenize_shard,
)
from loraflow.errors import DataError
from loraflow.layout import read_jsonl
from loraflow.models import bundled_minilm_dir

CLS = "sequence-classification"
BOS, EOS = 1, 2


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def classification(tmp_path_factory) -> PreparedDataset:
    root = tmp_path_factory.mktemp("cls")
    colours = ["red", "green", "blue"]
    rows = [{"text": f"sentence {i} " + "with quite a lot of extra words " * (i % 4), "label": colours[i % 3]}
            for i in range(90)]
    return prepare_dataset(DatasetSpec(path=str(write_jsonl(root / "d.jsonl", rows))), CLS, root / "data")


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> str:
    """A word-level fast tokenizer with BOS and EOS, built offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "what is the capital of france paris question answer it one two three four plus".split()
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, "<pad>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    path = tmp_path_factory.mktemp("tok") / "word-tokenizer"
    fast.save_pretrained(path)
    return str(path)


def test_plan_shards_covers_every_row_once(classification):
    shards = split_into_shards(classification, shard_size=7)
    assert [s.split for s in shards] == sorted((s.split for s in shards), key=SPLITS.index)
    for split in SPLITS:
        ranges = [(s.start, s.stop) for s in shards if s.split == split]
        lines = len(read_jsonl(classification.splits[split]))
        covered = [i for start, stop in ranges for i in range(start, stop)]
        assert covered == list(range(lines))
        assert all(0 < stop - start <= 7 for start, stop in ranges)
    assert len({s.fingerprint for s in shards}) == len(shards)


def test_shards_also_stop_at_a_byte_budget(monkeypatch, tmp_path, classification):
    """Long rows make short shards, so one task's token lists stay small whatever shard_size says."""
    import loraflow.data.tokenize as tokenize

    monkeypatch.setattr(tokenize, "SHARD_MAX_BYTES", 400)
    train = Path(classification.splits["train"]).read_bytes().splitlines(keepends=True)
    shards = [s for s in split_into_shards(classification, shard_size=1000) if s.split == "train"]
    assert len(shards) > 1
    assert [s.start for s in shards] == [0, *(s.stop for s in shards[:-1])] and shards[-1].stop == len(train)
    for shard in shards:
        size = sum(map(len, train[shard.start:shard.stop]))
        assert size <= 400 or shard.stop - shard.start == 1
        assert shard.offset == sum(map(len, train[:shard.start]))
        assert pq.read_table(tokenize_shard(shard, str(bundled_minilm_dir()), CLS, 16, tmp_path)).num_rows == shard.stop - shard.start


def test_empty_split_gets_one_empty_shard(tmp_path, classification):
    empty = tmp_path / "validation.jsonl"
    empty.write_text("")
    prepared = classification.model_copy(update={"splits": {**classification.splits, "validation": str(empty)}})
    (shard,) = [s for s in split_into_shards(prepared, 1000) if s.split == "validation"]
    assert (shard.start, shard.stop) == (0, 0)
    path = tokenize_shard(shard, str(bundled_minilm_dir()), CLS, 16, tmp_path / "tok")
    assert pq.read_table(path).num_rows == 0


def test_classification_shard_with_minilm(tmp_path, classification):
    tokenizer = str(bundled_minilm_dir())
    shard = split_into_shards(classification, 1000)[0]
    path = tokenize_shard(shard, tokenizer, CLS, 12, tmp_path)
    table = pq.read_table(path)
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("labels").type == pa.int64()
    rows = table.to_pylist()
    source = read_jsonl(shard.source)
    assert len(rows) == len(source) == shard.stop
    assert all(len(r["input_ids"]) == len(r["attention_mask"]) <= 12 for r in rows)
    assert max(len(r["input_ids"]) for r in rows) == 12  # long rows were truncated
    assert [r["labels"] for r in rows] == [s["label_id"] for s in source]
    assert list(Path(tmp_path).glob(".*.tmp")) == []


@pytest.mark.parametrize("truncation_side", ["right", "left"])
def test_shard_tokens_are_what_the_transformers_tokenizer_gives(tmp_path, classification, truncation_side):
    """The shard encoder calls the Rust tokenizer directly; it must agree with `tokenizer(...)`
    on special tokens and on which end long rows are cut from."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(bundled_minilm_dir(), truncation_side=truncation_side)
    reference.save_pretrained(tmp_path / "minilm")
    shard = split_into_shards(classification, 1000)[0]
    rows = pq.read_table(tokenize_shard(shard, str(tmp_path / "minilm"), CLS, 12, tmp_path / "tok")).to_pylist()
    expected = reference([row["text"] for row in read_jsonl(shard.source)], truncation=True, max_length=12)
    assert [row["input_ids"] for row in rows] == expected["input_ids"]
    assert [row["attention_mask"] for row in rows] == expected["attention_mask"]
    assert any(len(ids) == 12 for ids in expected["input_ids"])  # some rows were cut


def test_tokenize_shard_is_deterministic_and_reuses_its_file(tmp_path, classification):
    tokenizer = str(bundled_minilm_dir())
    shard = split_into_shards(classification, 1000)[-1]
    first = tokenize_shard(shard, tokenizer, CLS, 16, tmp_path)
    mtime = Path(first).stat().st_mtime_ns
    assert tokenize_shard(shard, tokenizer, CLS, 16, tmp_path) == first
    assert Path(first).stat().st_mtime_ns == mtime
    assert tokenize_shard(shard, tokenizer, CLS, 32, tmp_path) != first  # settings are part of the name
    hand_built = Shard(**shard.model_dump(exclude={"offset"}))  # no offset: rows are found by counting lines
    assert hand_built.offset is None
    assert tokenize_shard(hand_built, tokenizer, CLS, 16, tmp_path / "again").endswith(Path(first).name)


def test_changed_source_is_refused(tmp_path, classification):
    copy = tmp_path / "train.jsonl"
    copy.write_bytes(Path(classification.splits["train"]).read_bytes())
    prepared = classification.model_copy(update={"splits": {**classification.splits, "train": str(copy)}})
    shard = split_into_shards(prepared, 1000)[0]
    copy.write_text(copy.read_text().replace("sentence", "changed"))
    with pytest.raises(DataError, match="changed since the shards were planned"):
        tokenize_shard(shard, str(bundled_minilm_dir()), CLS, 16, tmp_path / "tok")


def test_shard_paths_by_split_restores_order(tmp_path, classification):
    shards = split_into_shards(classification, 10)
    paths = [tokenize_shard(s, str(bundled_minilm_dir()), CLS, 16, tmp_path) for s in shards]
    shuffled = paths[:]
    random.Random(0).shuffle(shuffled)
    grouped = shard_paths_by_split(shuffled)
    assert list(grouped) == list(SPLITS)
    assert [p for split in SPLITS for p in grouped[split]] == paths


def test_each_thread_gets_its_own_tokenizer(tmp_path, classification):
    """Dask thread workers share a process; a fast tokenizer must not be shared between threads."""
    from concurrent.futures import ThreadPoolExecutor

    tokenizer = str(bundled_minilm_dir())
    shards = split_into_shards(classification, 10)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda s: tokenize_shard(s, tokenizer, CLS, 16, tmp_path), shards))
        (other,) = set(pool.map(lambda _: id(load_tokenizer(tokenizer)), range(1)))
    assert len(set(paths)) == len(shards)
    assert load_tokenizer(tokenizer) is load_tokenizer(tokenizer) and id(load_tokenizer(tokenizer)) != other


def causal_dataset(tmp_path: Path, rows: list[dict], **spec) -> PreparedDataset:
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    return prepare_dataset(DatasetSpec(path=str(path), test_fraction=0.3, **spec), "causal-lm", tmp_path / "data")


def test_causal_prompt_tokens_are_masked_and_eos_appended(tmp_path, word_tokenizer):
    numbers = "one two three four".split()
    rows = [
        {"q": f"question {a} plus {b}", "a": f"answer {a} {b} {c}"}
        for a in numbers for b in numbers for c in numbers
    ]
    prepared = causal_dataset(tmp_path, rows, prompt_column="q", completion_column="a")
    shard = split_into_shards(prepared, 1000)[0]
    table = pq.read_table(tokenize_shard(shard, word_tokenizer, "causal-lm", 64, tmp_path / "tok"))
    assert table.schema.field("labels").type == pa.list_(pa.int32())
    source = read_jsonl(shard.source)
    tokenizer = load_tokenizer(word_tokenizer)
    for row, original in zip(table.to_pylist(), source):
        prompt_ids = tokenizer(causal_prompt_text(original["prompt"]))["input_ids"]
        full_ids = tokenizer(causal_prompt_text(original["prompt"]) + original["completion"])["input_ids"]
        assert row["input_ids"] == full_ids + [EOS]
        assert row["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        assert row["labels"][len(prompt_ids):] == row["input_ids"][len(prompt_ids):]
        assert row["labels"][-1] == EOS and len(row["labels"]) == len(row["input_ids"])


def test_causal_plain_text_labels_equal_ids_and_truncation_keeps_eos(tmp_path, word_tokenizer):
    words = "what is the capital of france paris one two three four".split()
    rows = [{"text": " ".join(words[i:] + words[:i] + words[: i % 5])} for i in range(len(words))]
    rows += [{"text": " ".join(reversed(r["text"].split()))} for r in rows]
    prepared = causal_dataset(tmp_path, rows)
    paths = [tokenize_shard(s, word_tokenizer, "causal-lm", 8, tmp_path / "tok") for s in split_into_shards(prepared, 1000)]
    table = pa.concat_tables(pq.read_table(p) for p in paths)
    assert table.num_rows == len(rows)
    for row in table.to_pylist():
        assert row["labels"] == row["input_ids"] and len(row["input_ids"]) <= 8
        assert row["input_ids"][0] == BOS and row["input_ids"][-1] == EOS
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def _long_prompt_rows(long: int) -> list[dict]:
    """Prompts of 4 words and answers of 3, and `long` prompts of 25 words: past max_length 12."""
    numbers = "one two three four".split()
    rows = [{"q": f"question {a} plus {b}", "a": f"answer {a} {b}"} for a in numbers for b in numbers]
    filler = " ".join(numbers * 5)
    rows += [{"q": f"question {row['q']} {filler}", "a": "answer paris it"} for row in rows[:long]]
    return rows


def _tokenise_all(prepared: PreparedDataset, tokenizer: str, tmp_path: Path) -> list[str]:
    return [tokenize_shard(s, tokenizer, "causal-lm", 12, tmp_path / "tok") for s in split_into_shards(prepared, 1000)]


def test_a_prompt_that_fills_max_length_goes_to_rejects_with_its_line(tmp_path, word_tokenizer):
    prepared = causal_dataset(tmp_path, _long_prompt_rows(3), prompt_column="q", completion_column="a")
    paths = _tokenise_all(prepared, word_tokenizer, tmp_path)
    assert sum(pq.read_table(path).num_rows for path in paths) == 16
    for row in pa.concat_tables(pq.read_table(path) for path in paths).to_pylist():
        assert any(label != IGNORE_INDEX for label in row["labels"][:-1])  # a completion token besides eos
    rejects_path, rejected = collect_rejects(prepared, paths, 12)
    rejects = read_jsonl(rejects_path)
    assert rejected == 3 and Path(rejects_path) == Path(prepared.data_dir) / "tokenize-12.rejects.jsonl"
    assert [(r["file"], r["line"], r["kind"]) for r in rejects] == [
        (str(tmp_path / "d.jsonl"), line, "prompt_fills_max_length") for line in (17, 18, 19)]
    assert rejects[0]["reason"].startswith("prompt fills max_length (12 tokens)")


def test_truncate_prompt_left_keeps_the_completion(tmp_path, word_tokenizer):
    prepared = causal_dataset(tmp_path, _long_prompt_rows(3), prompt_column="q", completion_column="a",
                              truncate_prompt="left")
    paths = _tokenise_all(prepared, word_tokenizer, tmp_path)
    assert collect_rejects(prepared, paths, 12) == (None, 0)
    tokenizer = load_tokenizer(word_tokenizer)
    answer = tokenizer("answer paris it", add_special_tokens=False)["input_ids"]
    long_rows = [row for path in paths for row in pq.read_table(path).to_pylist() if len(row["input_ids"]) == 12]
    assert len(long_rows) == 3
    for row in long_rows:
        assert row["input_ids"][0] == BOS and row["labels"][-4:] == [*answer, EOS]
        assert row["labels"][:-4] == [IGNORE_INDEX] * 8  # bos and the end of the prompt


def test_too_many_prompts_filling_max_length_fail_like_other_rejects(tmp_path, word_tokenizer):
    prepared = causal_dataset(tmp_path, _long_prompt_rows(12), prompt_column="q", completion_column="a",
                              max_reject_fraction=0.2)
    with pytest.raises(DataError, match=r"d.jsonl: 12 of 28 rows rejected \(43%; prompt_fills_max_length: 12, "
                                        r"when preparing: 0\), more than dataset.max_reject_fraction=0.2; see .+"
                                        r"tokenize-12.rejects.jsonl: shorten the prompts"):
        collect_rejects(prepared, _tokenise_all(prepared, word_tokenizer, tmp_path), 12)


def test_causal_with_a_tokenizer_without_eos(tmp_path):
    rows = [{"prompt": f"translate item {i}", "completion": f"the item is {i}"} for i in range(30)]
    prepared = causal_dataset(tmp_path, rows, prompt_column="prompt", completion_column="completion")
    shard = split_into_shards(prepared, 1000)[0]
    path = tokenize_shard(shard, str(bundled_minilm_dir()), "causal-lm", 32, tmp_path / "t")
    # MiniLM has no eos: nothing is appended; [CLS] + prompt are masked, the completion (+ [SEP]) is kept
    for row in pq.read_table(path).to_pylist():
        labels = row["labels"]
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert labels[:first] == [IGNORE_INDEX] * first and labels[first:] == row["input_ids"][first:]
        assert first == 4  # [CLS] translate item <n>


def test_tokenizers_with_steps_of_their_own_go_through_transformers():
    """A class that adds work in Python when called (seq2seq language codes, LUKE, LayoutLM) must
    not be bypassed by the direct call to the Rust encoder."""
    from loraflow.data.tokenize import _encode, _plain_fast_tokenizer

    tokenizer = load_tokenizer(str(bundled_minilm_dir()))
    assert _plain_fast_tokenizer(tokenizer)
    calls = []

    def _encode_plus(self, *args, **kwargs):
        calls.append(kwargs["max_length"])
        return type(tokenizer)._encode_plus(self, *args, **kwargs)

    custom = copy.copy(tokenizer)
    custom.__class__ = type("LanguageCodeTokenizer", (type(tokenizer),), {"_encode_plus": _encode_plus})
    assert not _plain_fast_tokenizer(custom)
    encodings = _encode(custom, ["a short text", "another one"], 8)
    assert calls == [8] and [e.ids for e in encodings] == [e.ids for e in _encode(tokenizer, ["a short text", "another one"], 8)]
