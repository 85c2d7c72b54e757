"""Tokenise prepared splits into Parquet shards, one independent unit of work per shard.

Shards are planned from the prepared JSONL files (row ranges plus a content hash) so a
scheduler can map over them: each shard is tokenised in one batched call of a fast
tokenizer, written atomically under a name derived from its content and the tokenising
settings, and skipped when that file already exists. A rerun, a retry or another
worker therefore never redoes finished shards and never trusts a half-written one.

Parquet schema (unpadded; padding is the collator's job):
- `input_ids`: list<int32>, truncated to `max_length`
- `attention_mask`: list<int8>
- `labels`: int64 class id (classification), or list<int32> the length of `input_ids`
  (causal-LM) with -100 on prompt tokens; plain text has labels == input_ids.
Causal-LM rows end with the tokenizer's eos token (when it has one) so the model learns to stop.
A prompt/completion row whose prompt fills `max_length`, leaving no completion token, would
teach "prompt, then stop": it is left out of the shard and listed in `<shard>.rejects.jsonl`
beside it, which `collect_rejects` gathers next to the dataset's own rejects.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from loraflow.chat import ChatEncoding, assistant_spans, training_template
from loraflow.data.prepare import SPLITS, PreparedDataset, causal_prompt_text
from loraflow.errors import DataError
from loraflow.fingerprint import hash_json
from loraflow.layout import atomic_write_bytes, atomic_write_jsonl, read_jsonl
from loraflow.task_table import TASK_TABLE, classifier

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's CrossEntropyLoss default)


class Shard(BaseModel):
    """Rows [start, stop) of one split's JSONL file, identified by the hash of their bytes.

    `offset` is the byte offset of row `start`, so a worker seeks instead of re-reading
    the file from the top; None (hand-built shards) means "count lines from the start".
    """

    split: str
    source: str
    start: int
    stop: int
    fingerprint: str
    offset: int | None = None
    truncate_prompt: str | None = None  # dataset.truncate_prompt
    chat: ChatEncoding | None = None  # task chat: how conversations become tokens


# A shard also closes at this much prepared JSONL, so long rows (causal-LM documents) make
# shorter shards and one task's token lists stay tens of MB, whatever `shard_size` says.
SHARD_MAX_BYTES = 4 * 2**20


def split_into_shards(prepared: PreparedDataset, shard_size: int, chat: ChatEncoding | None = None) -> list[Shard]:
    """Cover every row of every split (train, validation, test) with no overlap, in shards of
    at most `shard_size` rows and SHARD_MAX_BYTES (a row longer than that is a shard alone);
    a chat dataset's shards carry `chat`, how they are templated.

    An empty split still gets one empty shard, so every split has a (possibly empty) Parquet file.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    shards: list[Shard] = []
    for split in SPLITS:
        source = prepared.splits[split]
        before = len(shards)
        start = offset = 0
        chunk: list[bytes] = []
        chunk_bytes = 0
        with open(source, "rb") as handle:
            for line in handle:
                if chunk and (len(chunk) == shard_size or chunk_bytes + len(line) > SHARD_MAX_BYTES):
                    shards.append(_shard(split, source, start, chunk, offset, prepared.truncate_prompt, chat))
                    start, offset = start + len(chunk), offset + chunk_bytes
                    chunk, chunk_bytes = [], 0
                chunk.append(line)
                chunk_bytes += len(line)
        if chunk or len(shards) == before:
            shards.append(_shard(split, source, start, chunk, offset, prepared.truncate_prompt, chat))
    return shards


def _shard(split: str, source: str, start: int, lines: list[bytes], offset: int, truncate_prompt: str | None,
           chat: ChatEncoding | None) -> Shard:
    fingerprint = hashlib.sha256(b"".join(lines)).hexdigest()
    stop = start + len(lines)
    return Shard(split=split, source=source, start=start, stop=stop, fingerprint=fingerprint, offset=offset,
                 truncate_prompt=truncate_prompt, chat=chat)


def shard_file_name(shard: Shard, tokenizer_path: str, task: str, max_length: int) -> str:
    """`<split>-<start>-<content hash>-<settings hash>.parquet`: equal name means equal content."""
    settings = hash_json({"tokenizer": str(tokenizer_path), "task": task, "max_length": max_length,
                          "truncate_prompt": shard.truncate_prompt, "rejects": 1,
                          **({"chat": shard.chat.model_dump()} if shard.chat else {})})
    return f"{shard.split}-{shard.start:010d}-{shard.fingerprint[:16]}-{settings[:8]}.parquet"


def tokenize_shard(shard: Shard, tokenizer_path: str, task: str, max_length: int, out_dir: str | Path) -> str:
    """Tokenise one shard into `out_dir` and return the Parquet path (existing file reused)."""
    if task not in TASK_TABLE:
        raise DataError(f"task: unknown task {task!r} (valid: {', '.join(TASK_TABLE)})")
    encode = _ENCODERS[TASK_TABLE[task].rows]
    path = Path(out_dir) / shard_file_name(shard, tokenizer_path, task, max_length)
    if path.is_file():
        return str(path)
    rows = _read_rows(shard)
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}  # an empty split: the schema
    if rows:
        columns, rejects = encode(rows, load_tokenizer(str(tokenizer_path)), max_length, shard)
        if rejects:  # before the shard: a shard file means its rejects are written too
            atomic_write_jsonl(_rejects_path(path), rejects)
    atomic_write_bytes(path, _parquet_bytes(columns, task, shard))
    return str(path)


def _rejects_path(shard_path: str | Path) -> Path:
    return Path(shard_path).with_suffix(".rejects.jsonl")


def collect_rejects(prepared: PreparedDataset, shard_paths: list[str], max_length: int) -> tuple[str | None, int]:
    """Gather the shards' rejects into `<data>/tokenize-<max_length>.rejects.jsonl` beside the
    dataset's `rejects.jsonl`, with the file and line each row was read from; returns its path
    (None when no row was rejected) and how many rows it lists. Fails as preparation does when,
    with the rows preparation rejected, more than dataset.max_reject_fraction is rejected."""
    manifest = json.loads(Path(prepared.manifest_path).read_text(encoding="utf-8"))
    root = Path(manifest["spec"]["path"]).expanduser()
    rejects: dict[tuple[str, int], dict[str, Any]] = {}  # by source: a repeated train row is one row
    for shard_path in shard_paths:
        if _rejects_path(shard_path).is_file():
            for row in read_jsonl(_rejects_path(shard_path)):
                file = str(root / row["source"][0]) if root.is_dir() else str(root)
                rejects[(file, row["source"][1])] = {"file": file, "line": row["source"][1], **row["reject"]}
    path = Path(prepared.data_dir) / f"tokenize-{max_length}.rejects.jsonl"
    if not rejects:
        path.unlink(missing_ok=True)  # an earlier run's, on other data
        return None, 0
    atomic_write_jsonl(path, [rejects[key] for key in sorted(rejects)])
    counts, bound = manifest["counts"], manifest["spec"]["max_reject_fraction"]
    rejected, total = counts["rejected"] + len(rejects), counts["rejected"] + counts["accepted"]
    if rejected / total > bound:
        kinds = ", ".join(f"{kind}: {n}" for kind, n in Counter(row["kind"] for row in rejects.values()).items())
        chat = TASK_TABLE[manifest["task"]].rows == "conversation"
        fix = ("shorten the conversations, raise max_length" if chat
               else "shorten the prompts, raise max_length, set dataset.truncate_prompt: left")
        raise DataError(
            f"{manifest['spec']['path']}: {rejected} of {total} rows rejected ({rejected / total:.0%}; "
            f"{kinds}, when preparing: {counts['rejected']}), more than "
            f"dataset.max_reject_fraction={bound}; see {path}: {fix}, or raise dataset.max_reject_fraction"
        )
    return str(path), len(rejects)


def shard_paths_by_split(paths: list[str]) -> dict[str, list[str]]:
    """Group shard files back into splits (train, validation, test order), rows in order within each."""
    grouped: dict[str, list[tuple[int, str]]] = {}
    for path in paths:
        split, start, *_ = Path(path).name.split("-")
        grouped.setdefault(split, []).append((int(start), path))
    order = {split: i for i, split in enumerate(SPLITS)}
    return {split: [p for _, p in sorted(grouped[split])] for split in sorted(grouped, key=lambda s: order.get(s, 99))}


def load_tokenizer(tokenizer_path: str) -> Any:
    """One tokenizer per (path, thread): many shards share it, and a fast tokenizer must not be
    called from two threads at once (its truncation settings are mutable state)."""
    return _cached_tokenizer(tokenizer_path, threading.get_ident())


@lru_cache(maxsize=32)
def _cached_tokenizer(tokenizer_path: str, thread_id: int) -> Any:
    # From its own module: transformers' lazy top-level `__getattr__` fails when two threads touch it
    # first at once ("cannot import name 'AutoTokenizer'"); a plain module import has Python's own lock.
    from transformers.models.auto.tokenization_auto import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as error:
        raise DataError(f"tokenizer: cannot load {tokenizer_path!r}: {str(error).splitlines()[0]}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"tokenizer: {tokenizer_path!r} has no fast (Rust) tokenizer; loraflow needs one for offsets and speed"
        )
    return tokenizer


def _read_rows(shard: Shard) -> list[dict[str, Any]]:
    """The shard's rows, after checking they are still the bytes that were planned."""
    with open(shard.source, "rb") as handle:
        if shard.offset is not None:
            handle.seek(shard.offset)
            lines = list(islice(handle, shard.stop - shard.start))
        else:
            lines = list(islice(handle, shard.start, shard.stop))
    if hashlib.sha256(b"".join(lines)).hexdigest() != shard.fingerprint:
        raise DataError(
            f"{shard.source}: rows {shard.start}-{shard.stop} changed since the shards were planned; "
            "prepare the dataset and plan the shards again"
        )
    return json.loads(b"[" + b",".join(lines) + b"]")  # one parse for the shard: a third of the time of one per row


def _field(rows: list[dict[str, Any]], key: str, shard: Shard) -> list[Any]:
    try:
        return [row[key] for row in rows]
    except KeyError:
        raise DataError(
            f"{shard.source}: rows have no {key!r} field; this file was not prepared for this task"
        ) from None


_Encoded = tuple[dict[str, list], list[dict[str, Any]]]  # the shard's columns, its rejects


def _classification(rows: list[dict[str, Any]], tokenizer: Any, max_length: int, shard: Shard) -> _Encoded:
    labels = _field(rows, "label_id", shard)
    input_ids = [encoding.ids for encoding in _encode(tokenizer, _field(rows, "text", shard), max_length)]
    return {"input_ids": input_ids, "attention_mask": _all_attended(input_ids), "labels": labels}, []


def _causal(rows: list[dict[str, Any]], tokenizer: Any, max_length: int, shard: Shard) -> _Encoded:
    """Mask the prompt by character offsets: exact even where prompt and completion share a token.
    `truncate_prompt: left` cuts long rows from the start (the prompt's) instead of the end."""
    eos = tokenizer.eos_token_id
    room = max_length - 1 if eos is not None else max_length  # keep one place for eos
    prompt_completion = bool(rows) and "prompt" in rows[0]
    if prompt_completion:
        prompts = [causal_prompt_text(p) for p in _field(rows, "prompt", shard)]
        texts = [p + c for p, c in zip(prompts, _field(rows, "completion", shard))]
        prompt_ends = [len(p) for p in prompts]
    else:
        texts = _field(rows, "text", shard)
        prompt_ends = [0] * len(texts)
    input_ids, labels, rejects = [], [], []
    side = "left" if shard.truncate_prompt == "left" else None
    for row, encoding, prompt_end in zip(rows, _encode(tokenizer, texts, room, side), prompt_ends):
        ids = encoding.ids
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        if prompt_completion:
            masked = _prompt_mask(encoding.offsets, prompt_end)
            if all(masked):
                rejects.append({"source": row["source"], "reject": _prompt_fills(row, max_length)})
                continue
            row_labels = [IGNORE_INDEX if hidden else token for token, hidden in zip(ids, masked)]
            row_labels += ids[len(masked):]  # the appended eos is a completion token
        else:
            row_labels = list(ids)
        input_ids.append(ids)
        labels.append(row_labels)
    return {"input_ids": input_ids, "attention_mask": _all_attended(input_ids), "labels": labels}, rejects


def _prompt_fills(row: dict[str, Any], max_length: int) -> dict[str, Any]:
    reason = (f"prompt fills max_length ({max_length} tokens): no completion token is left to train on; shorten "
              "the prompt, raise max_length or set dataset.truncate_prompt: left")
    return {"reason": reason, "content": row["prompt"][:200], "kind": "prompt_fills_max_length"}


def _encode(tokenizer: Any, texts: list[str], max_length: int, side: str | None = None) -> list[Any]:
    """What `tokenizer(texts, truncation=True, max_length=max_length)` computes (special tokens,
    truncation side), as the Rust tokenizer's encodings: transformers would spend as long again
    turning each one into a Python dict of fields this module does not use. Tokenizer classes
    that add steps of their own in Python (seq2seq language codes, LUKE, LayoutLM) go through
    transformers. `side` overrides the tokenizer's truncation side (this thread's own tokenizer)."""
    side = side or tokenizer.truncation_side
    if not _plain_fast_tokenizer(tokenizer):
        before, tokenizer.truncation_side = tokenizer.truncation_side, side
        try:
            return tokenizer(texts, truncation=True, max_length=max_length).encodings
        finally:
            tokenizer.truncation_side = before
    backend = tokenizer.backend_tokenizer
    backend.no_padding()
    backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction=side)
    return backend.encode_batch(texts, add_special_tokens=True)


def _plain_fast_tokenizer(tokenizer: Any) -> bool:
    """Whether calling the tokenizer only sets truncation and runs the Rust encoder."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend as PreTrainedTokenizerFast

    kind = type(tokenizer)
    return kind._encode_plus is PreTrainedTokenizerFast._encode_plus and kind.__call__ is PreTrainedTokenizerBase.__call__


def _all_attended(input_ids: list[list[int]]) -> list[list[int]]:
    """Unpadded rows attend to every token."""
    return [[1] * len(ids) for ids in input_ids]


def _chat(rows: list[dict[str, Any]], tokenizer: Any, max_length: int, shard: Shard) -> _Encoded:
    """Templated conversations, loss on the turns `train_on` names; a conversation longer than
    `max_length` is left out whole (cutting it would train on a turn with its end cut off)."""
    if shard.chat is None:
        raise DataError(f"{shard.source}: a chat shard needs its chat template (Shard.chat)")
    template, train_on = training_template(tokenizer, shard.chat.template), shard.chat.train_on
    input_ids, labels, rejects = [], [], []
    for row, messages in zip(rows, _field(rows, "messages", shard)):
        ids, spans = assistant_spans(tokenizer, messages, template)
        if len(ids) > max_length:
            rejects.append({"source": row["source"], "reject": _too_long(row, len(ids), max_length)})
            continue
        kept = [range(len(ids))] if train_on == "all" else spans[-1:] if train_on == "last" else spans
        row_labels = [IGNORE_INDEX] * len(ids)
        for span in kept:
            row_labels[span.start:span.stop] = ids[span.start:span.stop]
        input_ids.append(ids)
        labels.append(row_labels)
    return {"input_ids": input_ids, "attention_mask": _all_attended(input_ids), "labels": labels}, rejects


def templated_lengths(conversations_path: str, tokenizer_path: str, chat: ChatEncoding) -> list[int]:
    """Tokens of each conversation of a prepared split after templating, counted as `_chat` counts them:
    what `--plan` reports before anything is tokenised."""
    tokenizer = load_tokenizer(tokenizer_path)
    template = training_template(tokenizer, chat.template)
    return [len(assistant_spans(tokenizer, row["messages"], template)[0]) for row in read_jsonl(conversations_path)]


def _too_long(row: dict[str, Any], tokens: int, max_length: int) -> dict[str, Any]:
    reason = (f"conversation has {tokens} tokens after templating, more than max_length={max_length}; shorten it "
              "or raise max_length")
    return {"reason": reason, "content": json.dumps(row["messages"], ensure_ascii=False)[:200],
            "kind": "too_long_for_max_length"}


_ENCODERS = {"labelled_text": _classification, "text": _causal, "conversation": _chat}  # by TaskDef.rows


def _prompt_mask(spans: list[tuple[int, int]], prompt_end: int) -> list[bool]:
    """True for prompt tokens: real tokens starting before `prompt_end`, and the special
    tokens (empty spans, e.g. BOS) that come before the first completion token."""
    mask, in_completion = [], False
    for start, stop in spans:
        if stop > start:
            in_completion = start >= prompt_end
        mask.append(not in_completion)
    return mask


def _parquet_bytes(columns: dict[str, list], task: str, shard: Shard) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    label_type = pa.int64() if classifier(task) else pa.list_(pa.int32())
    schema = pa.schema(
        [("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())), ("labels", label_type)],
        metadata={"loraflow.task": task, "loraflow.split": shard.split, "loraflow.rows_sha256": shard.fingerprint},
    )
    table = pa.Table.from_pydict(columns, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
