"""Dataset preparation: readers, rejects, one-line errors, splits, repeats and the demo dataset."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loraflow.config import DatasetSpec
from loraflow.data.prepare import (
    SPLITS,
    PreparedDataset,
    causal_prompt_text,
    prepare_dataset,
    source_fingerprint,
)
from loraflow.errors import DataError
from loraflow.layout import read_jsonl

CLS = "sequence-classification"
TOPICS = Path(__file__).resolve().parents[1] / "loraflow" / "sample_data" / "topics.csv"


def labelled_rows(n: int, labels: tuple[str, ...] = ("pos", "neg"), prefix: str = "example") -> list[dict]:
    """Distinct texts, labels cycling: enough rows that every class lands in train."""
    return [{"text": f"{prefix} sentence number {i} about things", "label": labels[i % len(labels)]} for i in range(n)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    lines = ["text,label"] + [f'"{r["text"]}",{r["label"]}' for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def prepare(tmp_path: Path, path: Path, task: str = CLS, **spec) -> PreparedDataset:
    return prepare_dataset(DatasetSpec(path=str(path), **spec), task, tmp_path / "out")


def all_rows(prepared: PreparedDataset) -> dict[str, list[dict]]:
    return {split: read_jsonl(prepared.splits[split]) for split in SPLITS}


def rejects(prepared_or_dir: PreparedDataset | Path) -> list[dict]:
    path = prepared_or_dir.rejects_path if isinstance(prepared_or_dir, PreparedDataset) else prepared_or_dir
    return read_jsonl(path)


def position(text: str) -> float:
    """Where the contract says a row lands: sha256 of its normalised text mapped to [0, 1)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def error_of(tmp_path: Path, path: Path, task: str = CLS, **spec) -> str:
    with pytest.raises(DataError) as caught:
        prepare(tmp_path, path, task, **spec)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- readers -----------------------------------------------------------------------------


def test_csv_with_bom_crlf_quoted_commas_newlines_and_extra_column(tmp_path):
    body = ['id,text,label', '1,"Hello, world, again",a', '2,"two\r\nlines here",b']
    body += [f'{i},"row {i}, with a comma",{"ab"[i % 2]}' for i in range(3, 40)]
    body += ['40,"tail row",b']
    path = tmp_path / "data.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(body).encode() + b"\r\n")
    prepared = prepare(tmp_path, path)
    rows = [row for split in all_rows(prepared).values() for row in split]
    texts = {row["text"] for row in rows}
    assert "Hello, world, again" in texts
    assert "two lines here" in texts  # the quoted newline is whitespace, collapsed
    assert len(rows) == 40 and prepared.counts["rejected"] == 0
    assert set(rows[0]) == {"text", "label", "label_id"}
    assert prepared.labels == ["a", "b"]


def test_csv_records_carry_the_line_they_start_on(tmp_path):
    path = tmp_path / "lines.csv"
    rows = labelled_rows(30)
    lines = ["text,label", '"spans\ntwo lines",pos', '"",neg'] + [f"{r['text']},{r['label']}" for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepared = prepare(tmp_path, path)
    (bad,) = rejects(prepared)
    assert bad["line"] == 4 and bad["file"] == str(path) and "'text'" in bad["reason"]


def test_jsonl_malformed_line_is_rejected_and_good_rows_kept(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [json.dumps(r) for r in labelled_rows(30)]
    rows.insert(4, '{"text": "broken", "label": ')
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    prepared = prepare(tmp_path, path)
    (bad,) = rejects(prepared)
    assert bad["line"] == 5 and "malformed JSON" in bad["reason"] and bad["content"].startswith('{"text": "broken"')
    assert sum(len(r) for r in all_rows(prepared).values()) == 30


def test_json_array_file_is_read(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(labelled_rows(30)), encoding="utf-8")
    assert prepare(tmp_path, path).counts["rejected"] == 0


def test_txt_is_causal_text_one_example_per_line(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = [f"line {i} of the   corpus text" for i in range(40)]
    path.write_text("\r\n".join(lines[:20]) + "\r\n\r\n" + "\n".join(lines[20:]) + "\n", encoding="utf-8")
    prepared = prepare(tmp_path, path, task="causal-lm")
    rows = [row for split in all_rows(prepared).values() for row in split]
    assert len(rows) == 40 and all(set(row) == {"text"} for row in rows)
    assert "line 3 of the corpus text" in {row["text"] for row in rows}
    assert prepared.labels is None and prepared.label_map_path is None
    sample = read_jsonl(prepared.sample_prompts_path)[0]
    assert set(sample) == {"prompt", "input", "reference"} and sample["input"] == sample["prompt"]
    assert f"{sample['prompt']} {sample['reference']}" in {row["text"] for row in rows}


def test_txt_for_classification_is_an_error(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("a line\n", encoding="utf-8")
    message = error_of(tmp_path, path)
    assert "corpus.txt" in message and "txt" in message and "label column" in message


def test_parquet_with_integer_labels_in_numeric_order(tmp_path):
    path = tmp_path / "data.parquet"
    labels = [2, 10, 1]
    texts = [f"parquet row {i} text" for i in range(45)]
    pq.write_table(pa.table({"text": texts, "label": [labels[i % 3] for i in range(45)], "x": list(range(45))}), path)
    prepared = prepare(tmp_path, path)
    assert prepared.labels == ["1", "2", "10"]
    label_map = json.loads(Path(prepared.label_map_path).read_text())
    assert label_map == {"id2label": {"0": "1", "1": "2", "2": "10"}, "label2id": {"1": 0, "2": 1, "10": 2}}
    row = all_rows(prepared)["train"][0]
    assert row["label_id"] == label_map["label2id"][row["label"]]


def test_directory_of_mixed_files_sorted_recursive_hidden_skipped(tmp_path):
    data = tmp_path / "mixed"
    (data / "sub").mkdir(parents=True)
    (data / ".hidden").mkdir()
    rows = labelled_rows(60)
    write_csv(data / "a.csv", rows[:20])
    write_jsonl(data / "sub" / "b.jsonl", rows[20:40])
    pq.write_table(pa.Table.from_pylist(rows[40:]), data / "c.parquet")
    write_jsonl(data / ".hidden" / "d.jsonl", [{"text": "never read", "label": "pos"}])
    write_jsonl(data / ".e.jsonl", [{"text": "never read", "label": "pos"}])
    (data / "README.md").write_text("not data")
    prepared = prepare(tmp_path, data)
    texts = {row["text"] for split in all_rows(prepared).values() for row in split}
    assert len(texts) == 60 and "never read" not in texts
    manifest = json.loads(Path(prepared.manifest_path).read_text())
    assert [s["path"] for s in manifest["sources"]] == ["a.csv", "c.parquet", "sub/b.jsonl"]
    assert all(len(s["sha256"]) == 64 for s in manifest["sources"])


# --- errors --------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    message = error_of(tmp_path, tmp_path / "nope.csv")
    assert "nope.csv" in message and "does not exist" in message and "dataset.path" in message


def test_directory_without_supported_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("x")
    message = error_of(tmp_path, tmp_path / "d")
    assert "no supported data files" in message and "notes.md" in message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert "empty.jsonl: file is empty" in error_of(tmp_path, path)


def test_csv_with_only_a_header(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("text,label\r\n")
    message = error_of(tmp_path, path)
    assert "header.csv" in message and "header but no data rows" in message


def test_missing_column_names_column_file_present_columns_and_suggestion(tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text("id,txt,label\n1,hello,a\n")
    message = error_of(tmp_path, path)
    assert "cols.csv" in message and "'text'" in message
    assert "'id', 'txt', 'label'" in message and "did you mean 'txt'" in message and "dataset.text_column" in message


def test_missing_column_in_jsonl_and_parquet(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "category": "a"}, {"text": "y", "category": "b"}])
    message = error_of(tmp_path, jsonl)
    assert "a.jsonl" in message and "'label'" in message and "'category'" in message
    assert "dataset.label_column" in message
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"sentence": ["x"], "label": ["a"]}), parquet)
    message = error_of(tmp_path, parquet)
    assert "b.parquet" in message and "'text'" in message and "'sentence'" in message


def test_mixed_label_types_name_an_example_of_each(tmp_path):
    rows = labelled_rows(20, labels=(0, 1))
    rows[7]["label"] = "one"
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    message = error_of(tmp_path, path)
    assert "mixes label types" in message and "int" in message and "str" in message
    assert f"{path}:1" in message and f"{path}:8" in message and "'one'" in message


def test_class_with_a_single_example(tmp_path):
    rows = labelled_rows(30) + [{"text": "the lonely one", "label": "rare"}]
    path = write_jsonl(tmp_path / "rare.jsonl", rows)
    message = error_of(tmp_path, path)
    assert "'rare'" in message and "only 1 example" in message and f"{path}:31" in message


def test_class_without_a_training_row(tmp_path):
    spec = DatasetSpec(path="unused")
    cut = spec.test_fraction + spec.validation_fraction
    held_out = [t for t in (f"held out text {i}" for i in range(500)) if position(t) < cut][:3]
    rows = labelled_rows(30) + [{"text": t, "label": "unlucky"} for t in held_out]
    message = error_of(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows))
    assert "'unlucky'" in message and "3 examples" in message and "none in the train split" in message
    assert "dataset.test_fraction" in message


def test_one_class_cannot_train(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", labelled_rows(30, labels=("pos",)))
    message = error_of(tmp_path, path)
    assert message.startswith(f"{path}: column 'label' (dataset.label_column) holds one class, 'pos'")
    assert "at least two in the train split" in message


def test_a_class_missing_from_the_test_split_is_named_in_a_warning(tmp_path):
    in_train = [t for t in (f"train only text {i}" for i in range(100)) if position(t) >= 0.5][:3]
    rows = labelled_rows(60) + [{"text": t, "label": "scarce"} for t in in_train]
    prepared = prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows))
    manifest = json.loads(Path(prepared.manifest_path).read_text())
    assert manifest["classes_missing"] == {"validation": ["scarce"], "test": ["scarce"]}
    assert prepared.warnings == manifest["warnings"] and len(prepared.warnings) == 2
    assert "the test split has no rows of class(es) 'scarce' (3 in all): test metrics cannot score them" in (
        prepared.warnings[1])
    assert "add examples of them or raise dataset.test_fraction" in prepared.warnings[1]


def test_labels_differing_only_in_case_or_spaces_are_reported(tmp_path):
    rows = labelled_rows(40, labels=("pos", "neg", "Pos", " neg "))
    prepared = prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows))
    assert prepared.labels == ["Pos", "neg", "pos"]  # spaces trimmed into one class, case kept apart
    (warning,) = prepared.warnings
    assert "differ only in case or surrounding spaces: ' neg ' / 'neg'; 'Pos' / 'pos';" in warning


def test_reject_fraction_bound(tmp_path):
    rows = labelled_rows(10) + [{"text": "", "label": "pos"}] * 6
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    message = error_of(tmp_path, path, max_reject_fraction=0.3)
    assert "6 of 16 rows rejected" in message and "dataset.max_reject_fraction" in message
    assert str(tmp_path / "out" / "failed-run.rejects.jsonl") in message
    assert len(rejects(tmp_path / "out" / "failed-run.rejects.jsonl")) == 6  # written before failing
    assert not (tmp_path / "out" / "rejects.jsonl").exists()  # reserved for a run whose data is usable


def test_a_failing_preparation_leaves_the_earlier_rejects_file_alone(tmp_path):
    good = write_jsonl(tmp_path / "data.jsonl", labelled_rows(40) + [{"text": "", "label": "pos"}])
    prepared = prepare(tmp_path, good)
    before = Path(prepared.rejects_path).read_bytes()
    write_jsonl(good, labelled_rows(10) + [{"text": "", "label": "pos"}] * 30)
    with pytest.raises(DataError):
        prepare(tmp_path, good)
    assert Path(prepared.rejects_path).read_bytes() == before
    assert len(rejects(tmp_path / "out" / "failed-run.rejects.jsonl")) == 30


def test_no_usable_rows(tmp_path):
    path = tmp_path / "none.jsonl"
    path.write_text('{"text": "", "label": "a"}\nnot json\n', encoding="utf-8")
    message = error_of(tmp_path, path, max_reject_fraction=1.0)
    assert "no usable rows" in message and "rejects.jsonl" in message


# --- rejects -------------------------------------------------------------------------------


def test_duplicates_conflicts_lengths_and_bad_bytes_go_to_rejects(tmp_path):
    path = tmp_path / "d.jsonl"
    good = [json.dumps(r).encode() for r in labelled_rows(40)]
    lines = good + [
        # a duplicate once whitespace is collapsed
        json.dumps({"text": "example  sentence number 3 about things", "label": "neg"}).encode(),
        json.dumps({"text": "example sentence number 4 about things", "label": "neg"}).encode(),  # conflicting label
        b'{"text": "caf\xe9 latin-1", "label": "pos"}',  # not UTF-8
        json.dumps({"text": "x" * 300, "label": "pos"}).encode(),
        json.dumps({"text": "hi", "label": "pos"}).encode(),
        json.dumps({"text": "no label here"}).encode(),
        json.dumps({"text": ["a", "list"], "label": "pos"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    prepared = prepare(tmp_path, path, min_chars=3, max_chars=200)
    by_line = {r["line"]: r for r in rejects(prepared)}
    assert set(by_line) == {41, 42, 43, 44, 45, 46, 47}
    assert by_line[41]["reason"] == f"duplicate of {path}:4"
    assert f"same text as {path}:5" in by_line[42]["reason"] and "'neg' here, 'pos' there" in by_line[42]["reason"]
    assert "UTF-8" in by_line[43]["reason"] and by_line[43]["kind"] == "invalid_utf8"
    assert "max_chars=200" in by_line[44]["reason"] and len(by_line[44]["content"]) <= 210
    assert "min_chars=3" in by_line[45]["reason"]
    assert "'label'" in by_line[46]["reason"] and "not text" in by_line[47]["reason"]
    assert all(set(r) >= {"file", "line", "reason", "content"} for r in by_line.values())
    manifest = json.loads(Path(prepared.manifest_path).read_text())
    assert manifest["rejected"]["total"] == 7 and manifest["rejected"]["by_kind"]["duplicate"] == 1
    assert prepared.counts["rejected"] == 7


def test_invalid_utf8_in_csv_rejects_only_that_record(tmp_path):
    path = tmp_path / "d.csv"
    body = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in labelled_rows(30))
    path.write_bytes(body.encode() + b"bad \xff byte,pos\nlast good row,neg\n")
    prepared = prepare(tmp_path, path)
    (bad,) = rejects(prepared)
    assert bad["line"] == 32 and bad["kind"] == "invalid_utf8"
    assert "last good row" in {r["text"] for split in all_rows(prepared).values() for r in split}


def test_unicode_is_nfc_normalised_and_whitespace_collapsed(tmp_path):
    decomposed, composed = "  Cafe\u0301\t au\n  lait ", "Caf\u00e9 au lait"
    rows = labelled_rows(30) + [{"text": decomposed, "label": "pos"}, {"text": composed, "label": "pos"}]
    prepared = prepare(tmp_path, write_jsonl(tmp_path / "u.jsonl", rows))
    texts = [r["text"] for split in all_rows(prepared).values() for r in split]
    assert "Caf\u00e9 au lait" in texts and prepared.counts["rejected"] == 1


# --- splits, repeats, manifest ------------------------------------------------------------


def test_split_is_stable_when_rows_are_added(tmp_path):
    small = labelled_rows(80)
    first = prepare(tmp_path / "a", write_jsonl(tmp_path / "small.jsonl", small))
    bigger = labelled_rows(80, prefix="extra") + small[::-1]
    second = prepare(tmp_path / "b", write_jsonl(tmp_path / "big.jsonl", bigger))
    where = {r["text"]: split for split, rows in all_rows(second).items() for r in rows}
    for split, rows in all_rows(first).items():
        assert rows and all(where[r["text"]] == split for r in rows)
    total = sum(len(r) for r in all_rows(second).values())
    assert 0.05 < len(all_rows(second)["test"]) / total < 0.3


def test_repeats_apply_to_train_only(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", labelled_rows(60))
    once = prepare(tmp_path / "one", path)
    thrice = prepare(tmp_path / "three", path, repeats=3)
    assert thrice.counts["train"] == 3 * once.counts["train"]
    assert len(read_jsonl(thrice.splits["train"])) == thrice.counts["train"]
    for split in ("validation", "test"):
        assert read_jsonl(thrice.splits[split]) == read_jsonl(once.splits[split])
    assert thrice.fingerprint != once.fingerprint


def test_manifest_label_map_and_prepared_model(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", labelled_rows(60, labels=("b", "a", "c")))
    prepared = prepare(tmp_path, path, name="demo", repeats=2)
    assert prepared.name == "demo" and prepared.labels == ["a", "b", "c"]
    assert PreparedDataset.model_validate_json(prepared.model_dump_json()) == prepared
    manifest = json.loads(Path(prepared.manifest_path).read_text())
    assert manifest["name"] == "demo" and manifest["task"] == CLS and manifest["repeats"] == 2
    assert manifest["fingerprint"] == prepared.fingerprint and manifest["spec"]["repeats"] == 2
    assert manifest["counts"]["train"] == prepared.counts["train"] == 2 * manifest["counts"]["train_unique"]
    assert sum(manifest["label_counts"]["test"].values()) == prepared.counts["test"]
    assert manifest["sources"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(Path(prepared.label_map_path).read_text())["label2id"] == {"a": 0, "b": 1, "c": 2}
    assert Path(prepared.rejects_path).read_text() == ""
    samples = read_jsonl(prepared.sample_prompts_path)
    assert len(samples) == 5 and all(set(s) == {"text", "label"} for s in samples)
    assert {s["text"] for s in samples} <= {r["text"] for r in read_jsonl(prepared.splits["test"])}
    assert len({s["label"] for s in samples}) == 3  # rotates through the classes


def test_prepare_is_deterministic_and_max_rows_keeps_file_order(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", labelled_rows(100))
    a, b = prepare(tmp_path / "a", path), prepare(tmp_path / "b", path)
    assert a.fingerprint == b.fingerprint
    limited = prepare(tmp_path / "c", path, max_rows=50)
    texts = {r["text"] for rows in all_rows(limited).values() for r in rows}
    assert texts == {r["text"] for r in labelled_rows(50)}


def test_source_fingerprint_tracks_bytes_and_spec(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", labelled_rows(30))
    spec = DatasetSpec(path=str(path))
    base = source_fingerprint(spec, CLS)
    assert source_fingerprint(DatasetSpec(path=str(path)), CLS) == base
    assert source_fingerprint(spec.model_copy(update={"min_chars": 5}), CLS) != base
    assert source_fingerprint(spec, "causal-lm") != base
    write_jsonl(path, labelled_rows(31))
    assert source_fingerprint(spec, CLS) != base
    with pytest.raises(DataError, match="does not exist"):
        source_fingerprint(DatasetSpec(path=str(tmp_path / "gone")), CLS)


def test_prompt_completion_rows_and_samples(tmp_path):
    rows = [{"instruction": f"Question {i}: what is {i} plus {i}?", "answer": f"It is {2 * i}.", "id": i}
            for i in range(40)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    prepared = prepare(tmp_path, path, task="causal-lm", prompt_column="instruction", completion_column="answer")
    train = read_jsonl(prepared.splits["train"])
    assert train and all(set(r) == {"prompt", "completion", "source"} for r in train)
    assert all(r["source"] == ["qa.jsonl", int(r["prompt"].split()[1][:-1]) + 1] for r in train)  # where it was read
    samples = read_jsonl(prepared.sample_prompts_path)
    assert samples and all(s["input"] == causal_prompt_text(s["prompt"]) and "reference" in s for s in samples)
    assert causal_prompt_text("Q") == "Q\n"


# --- the demo dataset ----------------------------------------------------------------------


def test_demo_dataset_is_clean_and_balanced(tmp_path):
    prepared = prepare(tmp_path, TOPICS)
    assert prepared.counts["rejected"] == 0
    assert prepared.labels is not None and len(prepared.labels) == 5
    total = sum(prepared.counts[s] for s in SPLITS)
    assert 500 <= total <= 700
    for split, rows in all_rows(prepared).items():
        assert {r["label"] for r in rows} == set(prepared.labels), split
