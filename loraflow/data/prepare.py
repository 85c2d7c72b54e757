"""Turn a user's dataset into normalised, split, fingerprinted JSONL files.

Everything the rest of the pipeline trusts about the data is decided here, once:
- which rows are usable (the rest go to `rejects.jsonl` with file, line and reason),
- what the text is (Unicode NFC, whitespace collapsed, stripped),
- which split each row belongs to: by a hash of its content, so a row never changes split
  when rows are added or files are reordered, and test sets stay comparable across runs,
- the label ids (numeric order for integer labels, alphabetical otherwise).

The result is a small `PreparedDataset` of paths and a fingerprint: it is what moves
between tasks, never the rows themselves. Preparation is a pure function of the input
bytes, the spec and the task, which is what `source_fingerprint` hashes as a cache key.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from loraflow.chat import BadConversation, ConversationForm, conversation_form, normalise_conversation
from loraflow.config import DatasetSpec
from loraflow.data.readers import Record, column_names, read_records, source_files
from loraflow.errors import ConfigError, DataError
from loraflow.fingerprint import hash_file, hash_json, source_version
from loraflow.layout import atomic_write_bytes, atomic_write_json
from loraflow.settings import TASKS
from loraflow.task_table import TASK_TABLE

SPLITS: tuple[str, ...] = ("train", "validation", "test")
PROMPT_SEPARATOR = "\n"
SAMPLE_PROMPTS = 5
_FORMAT_VERSION = 2  # bump when the normalised output changes for the same input
_SPEC_FIELDS_IGNORED = ("path", "name")  # path: its files' bytes are hashed instead; name: added separately
_HASH_SCALE = float(2**64)
_Row = tuple[bytes, tuple[str, ...]]  # (sha256 of the training text, normalised column values)


def causal_prompt_text(prompt: str) -> str:
    """What a causal LM sees before the completion, in training and in generation alike."""
    return prompt + PROMPT_SEPARATOR


class PreparedDataset(BaseModel):
    """Paths and counts of one prepared dataset: small, JSON-serialisable, safe to pass between tasks."""

    name: str
    task: str
    data_dir: str
    splits: dict[str, str]
    counts: dict[str, int]
    labels: list[str] | None
    label_map_path: str | None
    manifest_path: str
    rejects_path: str
    sample_prompts_path: str
    fingerprint: str
    truncate_prompt: str | None = None  # dataset.truncate_prompt, for tokenisation
    warnings: list[str] = Field(default_factory=list)  # what may train badly though it trains
    classes_missing: dict[str, list[str]] = Field(default_factory=dict)  # per evaluation split, the classes it lacks


def normalise_text(text: str) -> str:
    """NFC, every run of whitespace to one space, stripped: equal-looking texts compare equal."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return " ".join(text.split())


def _columns(spec: DatasetSpec, task: str) -> dict[str, str]:
    """Input column -> the setting that names it, in the order rows are built from."""
    if task not in TASKS:
        raise ConfigError(f"task: unknown task {task!r} (valid: {', '.join(TASKS)})")
    rows = TASK_TABLE[task].rows
    if rows == "conversation":  # the columns are found per file (`conversation_form`)
        return {"messages": "conversation_format"}
    if rows == "labelled_text":
        pairs = [(spec.text_column, "text_column"), (spec.label_column, "label_column")]
    elif spec.prompt_column is not None and spec.completion_column is not None:
        pairs = [(spec.prompt_column, "prompt_column"), (spec.completion_column, "completion_column")]
    else:
        pairs = [(spec.text_column, "text_column")]
    if pairs[0][0] == pairs[-1][0] and len(pairs) > 1:
        raise ConfigError(
            f"dataset.{pairs[0][1]} and dataset.{pairs[1][1]} both name {pairs[0][0]!r}; they must differ"
        )
    return dict(pairs)


def _files(spec: DatasetSpec, task: str, columns: dict[str, str]) -> list[tuple[Path, str]]:
    files = source_files(spec.path, spec.format)
    if set(columns.values()) != {"text_column"}:
        for file, fmt in files:
            if fmt == "txt":
                what = {"labelled_text": "label column", "conversation": "conversations"}.get(
                    TASK_TABLE[task].rows, "prompt/completion columns")
                raise DataError(
                    f"{file}: a .txt file has no {what} (one example per line, text only); "
                    "use CSV/JSONL with those columns, or plain causal-lm text data"
                )
    return files


def source_fingerprint(spec: DatasetSpec, task: str) -> str:
    """Cache key for preparation, computed before preparing: input bytes + spec + task + format version."""
    files = _files(spec, task, _columns(spec, task))
    return _source_fingerprint(spec, task, _source_entries(spec, files))


def _source_entries(spec: DatasetSpec, files: list[tuple[Path, str]]) -> list[dict[str, Any]]:
    root = Path(spec.path).expanduser()
    return [
        {
            "path": file.relative_to(root).as_posix() if root.is_dir() else file.name,
            "format": fmt,
            "bytes": file.stat().st_size,
            "sha256": hash_file(file),
        }
        for file, fmt in files
    ]


@lru_cache(maxsize=1)
def _code_version() -> str:
    """The preparation code itself: a change to how rows are read or normalised invalidates caches."""
    here = Path(__file__).resolve().parent
    return source_version(here / "readers.py", here / "prepare.py")


def _source_fingerprint(spec: DatasetSpec, task: str, sources: list[dict[str, Any]]) -> str:
    settings = {k: v for k, v in spec.model_dump().items() if k not in _SPEC_FIELDS_IGNORED}
    return hash_json(
        {"v": _FORMAT_VERSION, "code": _code_version(), "task": task, "name": spec.resolved_name,
         "spec": settings, "sources": sources}
    )


class _Collector:
    """Accepts or rejects records one at a time; holds accepted rows and the reject log."""

    def __init__(self, spec: DatasetSpec, task: str, columns: dict[str, str]) -> None:
        self.spec = spec
        self.classification = TASK_TABLE[task].rows == "labelled_text"
        self.chat = TASK_TABLE[task].rows == "conversation"
        self.prompt_completion = not self.classification and len(columns) == 2
        self.names = list(columns)  # column names, for reasons
        self.settings = list(columns.values())
        self.rows: list[_Row] = []
        self.first_seen: dict[bytes, tuple[str, str | None]] = {}  # digest -> ("file:line", label)
        self.rejects: list[dict[str, Any]] = []
        self.label_types: dict[str, tuple[str, Any]] = {}  # type name -> ("file:line", raw value)
        self.raw_labels: set[str] = set()  # string labels as written, before normalising

    def reject(self, record: Record, kind: str, reason: str) -> None:
        self.rejects.append(
            {"file": record.file, "line": record.line, "reason": reason, "content": record.content, "kind": kind}
        )

    def add(self, record: Record, form: ConversationForm | None = None) -> None:
        if record.problem is not None:
            self.reject(record, *record.problem)
            return
        accepted = self._conversation(record, form) if form is not None else self._values(record)
        if accepted is None:
            return
        values, training_text, size = accepted
        spec = self.spec
        if size < spec.min_chars:
            self.reject(record, "too_short", f"text has {size} chars, fewer than dataset.min_chars={spec.min_chars}")
            return
        if size > spec.max_chars:
            self.reject(record, "too_long", f"text has {size} chars, more than dataset.max_chars={spec.max_chars}")
            return
        digest = hashlib.sha256(training_text.encode("utf-8")).digest()
        label = values[1] if self.classification else None
        seen = self.first_seen.get(digest)
        if seen is not None:
            where, first_label = seen
            if first_label == label:
                self.reject(record, "duplicate", f"duplicate of {where}")
            else:
                reason = f"same text as {where} but label {label!r} here, {first_label!r} there"
                self.reject(record, "conflicting_label", reason)
            return
        self.first_seen[digest] = (f"{record.file}:{record.line}", label)
        self.rows.append((digest, tuple(values)))

    def _conversation(self, record: Record, form: ConversationForm) -> tuple[list[str], str, int] | None:
        """A chat row as its canonical messages JSON (one value: what dedup hashes and the split keeps);
        its size is the characters of its contents."""
        try:
            messages = normalise_conversation(form, record.values or (), self.spec)
        except BadConversation as bad:
            self.reject(record, bad.kind, bad.reason)
            return None
        text = json.dumps(messages, ensure_ascii=False)
        return [text], text, sum(len(message["content"]) for message in messages)

    def _values(self, record: Record) -> tuple[list[str], str, int] | None:
        """A row's column values, normalised, with its training text and that text's size."""
        values: list[str] = []
        for position, raw in enumerate(record.values or ()):
            if self.classification and position == 1:
                value = self._label(record, raw)
            else:
                value = self._text(record, raw, position)
            if not value:
                if value is not None:  # None means _text already rejected it
                    column, setting = self.names[position], self.settings[position]
                    self.reject(record, f"empty_{column}", f"empty or missing {column!r} (dataset.{setting})")
                return None
            values.append(value)
        training_text = causal_prompt_text(values[0]) + values[1] if self.prompt_completion else values[0]
        return values, training_text, len(training_text)

    def _text(self, record: Record, raw: Any, position: int) -> str | None:
        if isinstance(raw, str):
            return normalise_text(raw)
        if raw is None:
            return ""
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return str(raw)
        column = self.names[position]
        self.reject(record, f"bad_{column}", f"{column!r} is a {type(raw).__name__}, not text")
        return None

    def _label(self, record: Record, raw: Any) -> str | None:
        if raw is None or raw == "":
            return ""
        kind = type(raw).__name__
        if kind not in self.label_types:
            self.label_types[kind] = (f"{record.file}:{record.line}", raw)
            if len(self.label_types) > 1:
                (k1, (at1, v1)), (k2, (at2, v2)) = list(self.label_types.items())[:2]
                raise DataError(
                    f"{at2}: column {self.names[1]!r} mixes label types: {k1} (e.g. {v1!r} at {at1}) and "
                    f"{k2} ({v2!r} here); make every label the same type"
                )
        if isinstance(raw, str):
            self.raw_labels.add(raw)
            return normalise_text(raw)
        if isinstance(raw, (int, float)):  # bool is an int: True -> "True"
            return str(raw)
        self.reject(record, f"bad_{self.names[1]}", f"label is a {kind}, not a string or number")
        return None


def prepare_dataset(spec: DatasetSpec, task: str, data_dir: str | Path) -> PreparedDataset:
    """Read, validate, normalise, deduplicate, split and write one dataset under `data_dir`.

    No seed: splits come from content hashes, so every run (and every seed of a variations
    grid) shares one test set.
    """
    columns = _columns(spec, task)
    files = _files(spec, task, columns)
    data_dir = Path(data_dir)
    paths = {split: data_dir / f"{split}.jsonl" for split in SPLITS}
    rejects_path = data_dir / "rejects.jsonl"
    # A failing run keeps its rejects apart, so an earlier good run's rejects.jsonl stays true to its data.
    failed_rejects_path = data_dir / "failed-run.rejects.jsonl"
    collector = _Collector(spec, task, columns)
    _collect(collector, files, columns, spec.max_rows)
    rejects_payload = _jsonl_bytes(collector.rejects)
    try:
        _check_rejects(collector, spec, failed_rejects_path)
        labels = _label_order({values[1] for _, values in collector.rows}) if collector.classification else None
        by_split = _split(collector.rows, spec)
        if labels is not None:
            _check_classes(by_split, labels, collector)
        _check_splits(by_split, spec)
        missing = _classes_missing(by_split, labels) if labels is not None else {}
    except DataError:
        atomic_write_bytes(failed_rejects_path, rejects_payload)
        raise
    atomic_write_bytes(rejects_path, rejects_payload)
    failed_rejects_path.unlink(missing_ok=True)

    make_row = _row_maker(labels, collector, _source_of(collector, spec))
    payloads = {split: _jsonl_bytes([make_row(digest, values) for digest, values in by_split[split]])
                for split in SPLITS}
    payloads["train"] *= spec.repeats
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(split.encode() + b"\0" + hashlib.sha256(payloads[split]).digest())
    digest.update(json.dumps(labels).encode())
    fingerprint = digest.hexdigest()

    for split in SPLITS:
        atomic_write_bytes(paths[split], payloads[split])
    label_map_path = None
    if labels is not None:
        label_map_path = data_dir / "label_map.json"
        atomic_write_json(label_map_path, label_map(labels))
    samples_path = data_dir / "sample_prompts.jsonl"
    atomic_write_bytes(samples_path, _jsonl_bytes(_sample_prompts(by_split["test"], collector)))
    counts = {split: len(by_split[split]) for split in SPLITS}
    counts["train"] *= spec.repeats
    counts["rejected"] = len(collector.rejects)

    warnings = [*_label_look_alikes(collector), *_missing_warnings(missing, by_split, spec)]
    sources = _source_entries(spec, files)
    manifest_path = data_dir / "manifest.json"
    atomic_write_json(
        manifest_path,
        {
            "name": spec.resolved_name,
            "task": task,
            "fingerprint": fingerprint,
            "source_fingerprint": _source_fingerprint(spec, task, sources),
            "sources": sources,
            "spec": spec.model_dump(),
            "repeats": spec.repeats,
            "labels": labels,
            "counts": {**counts, "train_unique": len(by_split["train"]), "accepted": len(collector.rows)},
            "label_counts": _label_counts(by_split) if labels is not None else None,
            "classes_missing": missing,
            "warnings": warnings,
            "rejected": {"total": counts["rejected"], "by_kind": dict(Counter(r["kind"] for r in collector.rejects))},
            "format_version": _FORMAT_VERSION,
        },
    )
    return PreparedDataset(
        name=spec.resolved_name,
        task=task,
        data_dir=str(data_dir.resolve()),
        splits={split: str(paths[split].resolve()) for split in SPLITS},
        counts=counts,
        labels=labels,
        label_map_path=str(label_map_path.resolve()) if label_map_path else None,
        manifest_path=str(manifest_path.resolve()),
        rejects_path=str(rejects_path.resolve()),
        sample_prompts_path=str(samples_path.resolve()),
        fingerprint=fingerprint,
        truncate_prompt=spec.truncate_prompt,
        warnings=warnings,
        classes_missing=missing,
    )


def _collect(
    collector: _Collector, files: list[tuple[Path, str]], columns: dict[str, str], max_rows: int | None
) -> None:
    """Feed every record to the collector, stopping once `max_rows` rows were accepted."""
    add = collector.add
    for file, fmt in files:
        form = conversation_form(file, column_names(file, fmt), collector.spec) if collector.chat else None
        for record in read_records(file, fmt, form.columns if form else columns):
            add(record, form)
            if max_rows is not None and len(collector.rows) >= max_rows:
                return


def _check_rejects(collector: _Collector, spec: DatasetSpec, rejects_path: Path) -> None:
    rejected = len(collector.rejects)
    total = rejected + len(collector.rows)
    kinds = ", ".join(f"{kind}: {n}" for kind, n in Counter(r["kind"] for r in collector.rejects).most_common())
    if not collector.rows:
        raise DataError(
            f"{spec.path}: no usable rows: all {total} rows were rejected ({kinds or 'no rows'}); "
            f"see {rejects_path} for each row's file, line and reason"
        )
    if rejected / total > spec.max_reject_fraction:
        raise DataError(
            f"{spec.path}: {rejected} of {total} rows rejected ({rejected / total:.0%}; {kinds}), more than "
            f"dataset.max_reject_fraction={spec.max_reject_fraction}; see {rejects_path}, fix the data or raise "
            "dataset.max_reject_fraction"
        )


def _label_order(names: set[str]) -> list[str]:
    """Integer labels in numeric order ("2" before "10"), anything else alphabetical."""
    try:
        return sorted(names, key=lambda name: (int(name), name))
    except ValueError:
        return sorted(names)


def _split(rows: list[_Row], spec: DatasetSpec) -> dict[str, list[_Row]]:
    """Content hash -> [0, 1) -> split: a row's split never depends on the other rows."""
    test_cut = spec.test_fraction
    validation_cut = spec.test_fraction + spec.validation_fraction
    by_split: dict[str, list[_Row]] = {split: [] for split in SPLITS}
    train, validation, test = by_split["train"].append, by_split["validation"].append, by_split["test"].append
    for row in rows:
        position = int.from_bytes(row[0][:8], "big") / _HASH_SCALE
        if position < test_cut:
            test(row)
        elif position < validation_cut:
            validation(row)
        else:
            train(row)
    return by_split


def _check_classes(by_split: dict[str, list], labels: list[str], collector: _Collector) -> None:
    if len(labels) < 2:
        raise DataError(
            f"{collector.spec.path}: column {collector.names[1]!r} (dataset.label_column) holds one class, "
            f"{labels[0]!r}; classification needs at least two in the train split (add rows of another class)"
        )
    per_split = {split: Counter(values[1] for _, values in rows) for split, rows in by_split.items()}
    for label in labels:
        total = sum(per_split[split][label] for split in SPLITS)
        if total < 2:
            where = next(at for at, lab in collector.first_seen.values() if lab == label)
            raise DataError(
                f"{where}: class {label!r} has only {total} example; every class needs at least 2 "
                "(add examples of it or remove it)"
            )
        if per_split["train"][label] == 0:
            elsewhere = ", ".join(f"{per_split[s][label]} {s}" for s in SPLITS[1:])
            raise DataError(
                f"{collector.spec.path}: class {label!r} has {total} examples but none in the train split "
                f"({elsewhere}); add examples of it, or lower dataset.test_fraction / dataset.validation_fraction"
            )


def _classes_missing(by_split: dict[str, list], labels: list[str]) -> dict[str, list[str]]:
    """Per evaluation split that has rows, the classes it has none of: their scores go unmeasured."""
    missing = {}
    for split in SPLITS[1:]:
        present = {values[1] for _, values in by_split[split]}
        if by_split[split] and len(present) < len(labels):
            missing[split] = [label for label in labels if label not in present]
    return missing


def _missing_warnings(missing: dict[str, list[str]], by_split: dict[str, list], spec: DatasetSpec) -> list[str]:
    if not missing:
        return []
    totals = Counter(values[1] for rows in by_split.values() for _, values in rows)
    return [
        f"{spec.path}: the {split} split has no rows of class(es) "
        + ", ".join(f"{label!r} ({totals[label]} in all)" for label in labels)
        + f": {'test metrics cannot score' if split == 'test' else 'validation cannot see'} them; "
        f"add examples of them or raise dataset.{split}_fraction"
        for split, labels in missing.items()
    ]


_MOST_LOOK_ALIKES = 10


def _label_look_alikes(collector: _Collector) -> list[str]:
    """Labels written differently only in case or spaces: spaces are trimmed (one class), case is
    kept (two classes), and either is more often a typo than a meaning."""
    groups: dict[str, set[str]] = {}
    for raw in collector.raw_labels:
        groups.setdefault(normalise_text(raw).casefold(), set()).add(raw)
    alike = sorted(sorted(group) for group in groups.values() if len(group) > 1)
    if not alike:
        return []
    shown = "; ".join(" / ".join(repr(label) for label in group) for group in alike[:_MOST_LOOK_ALIKES])
    more = f" and {len(alike) - _MOST_LOOK_ALIKES} more" if len(alike) > _MOST_LOOK_ALIKES else ""
    return [
        f"{collector.spec.path}: column {collector.names[1]!r} has labels that differ only in case or "
        f"surrounding spaces: {shown}{more}; spaces are trimmed (one class), case is kept (separate classes); "
        "write them the same way if they mean the same"
    ]


def _check_splits(by_split: dict[str, list], spec: DatasetSpec) -> None:
    total = sum(len(rows) for rows in by_split.values())
    for split, setting in (("train", "test_fraction + dataset.validation_fraction"), ("test", "test_fraction")):
        if not by_split[split]:
            raise DataError(
                f"{spec.path}: the {split} split is empty ({total} usable rows); "
                f"add rows or adjust dataset.{setting}"
            )


def _source_of(collector: _Collector, spec: DatasetSpec) -> Any:
    """Row digest -> [file, line] of where it was read, the file relative to dataset.path (so moving
    the data changes no prepared byte): tokenisation names it when it rejects the row."""
    root = Path(spec.path).expanduser()

    def source(digest: bytes) -> list[Any]:
        where = collector.first_seen[digest][0]
        file, line = where.rsplit(":", 1)
        return [Path(file).relative_to(root).as_posix() if root.is_dir() else Path(file).name, int(line)]

    return source


def _row_maker(labels: list[str] | None, collector: _Collector, source: Any) -> Any:
    """(digest, values) -> the normalised JSONL row of the task: the shapes `tokenize.py` and evaluation read."""
    if collector.chat:
        return lambda digest, values: {"messages": json.loads(values[0]), "source": source(digest)}
    if labels is not None:
        label_ids = {name: i for i, name in enumerate(labels)}
        return lambda _, values: {"text": values[0], "label": values[1], "label_id": label_ids[values[1]]}
    if collector.prompt_completion:
        return lambda digest, values: {"prompt": values[0], "completion": values[1], "source": source(digest)}
    return lambda _, values: {"text": values[0]}


def _jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    dumps = json.dumps
    return "".join([dumps(row, ensure_ascii=False) + "\n" for row in rows]).encode("utf-8")


def _label_counts(by_split: dict[str, list]) -> dict[str, dict[str, int]]:
    return {split: dict(sorted(Counter(values[1] for _, values in rows).items())) for split, rows in by_split.items()}


def _sample_prompts(test_rows: list[_Row], collector: _Collector) -> list[dict[str, str]]:
    """A few test rows chosen by hash order (stable), rotating through the classes."""
    ordered = sorted(test_rows)
    if collector.classification:
        rank: Counter[str] = Counter()
        keyed = []
        for digest, values in ordered:
            keyed.append((rank[values[1]], digest, values))
            rank[values[1]] += 1
        return [{"text": v[0], "label": v[1]} for _, _, v in sorted(keyed)[:SAMPLE_PROMPTS]]
    if collector.chat:  # rendered with the chat template where they are run
        return [{"messages": json.loads(values[0])} for _, values in ordered[:SAMPLE_PROMPTS]]
    samples = []
    for _, values in ordered[:SAMPLE_PROMPTS]:
        # `input` is exactly what generation is fed: the training format, up to the answer.
        if collector.prompt_completion:
            samples.append({"prompt": values[0], "input": causal_prompt_text(values[0]), "reference": values[1]})
        else:
            words = values[0].split(" ")
            half = max(1, len(words) // 2)
            prompt = " ".join(words[:half])
            samples.append({"prompt": prompt, "input": prompt, "reference": " ".join(words[half:])})
    return samples


def label_map(labels: list[str]) -> dict[str, dict]:
    """`{"id2label": {0: name}, "label2id": {name: 0}}`: the model config's and label_map.json's shape."""
    return {"id2label": dict(enumerate(labels)), "label2id": {label: index for index, label in enumerate(labels)}}


def read_label_map(prepared: PreparedDataset) -> dict[str, Any]:
    """The `{"id2label", "label2id"}` mapping of a classification dataset (empty for causal-LM)."""
    if prepared.label_map_path is None:
        return {}
    return json.loads(Path(prepared.label_map_path).read_text(encoding="utf-8"))


__all__ = [
    "PROMPT_SEPARATOR",
    "SPLITS",
    "PreparedDataset",
    "causal_prompt_text",
    "normalise_text",
    "prepare_dataset",
    "read_label_map",
    "source_fingerprint",
]

