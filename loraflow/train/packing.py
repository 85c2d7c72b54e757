"""`packing: true`: short examples packed into rows of up to `max_length` tokens, none attending to another.

TRL does both halves. `pack_dataset` (best-fit decreasing) fills rows with whole examples, and its
padding-free collator concatenates a batch into one row with each example's position ids starting at 0
and its first label masked. Given position ids and no attention mask, transformers builds a
block-diagonal causal mask from them (sdpa and eager attention, on the CPU and CUDA), and
flash-attention's varlen kernels on CUDA read the collator's `cu_seq_lens`: no padding is computed and
no token sees another example.
"""

from __future__ import annotations

from typing import Any


def packed_rows(columns: dict[str, list[Any]], max_length: int) -> Any:
    """The tokenised rows (`input_ids`, `labels`) packed into a datasets.Dataset with `seq_lengths`."""
    from datasets import Dataset
    from trl import pack_dataset

    rows = Dataset.from_dict({"input_ids": columns["input_ids"], "labels": columns["labels"]})
    return pack_dataset(rows, max_length, strategy="bfd")


def packed_row_count(lengths: list[int], max_length: int) -> int:
    """How many rows `packed_rows` makes of rows of these lengths, without the rows: TRL's best-fit
    packing reads only the lengths, so one byte per token stands in for the ids (a dry run of
    millions of conversations needs megabytes, where Python lists of ids took gigabytes)."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from trl import pack_dataset

    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    ids = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.zeros(int(offsets[-1]), dtype=np.int8)))
    return len(pack_dataset(Dataset(InMemoryTable(pa.table({"input_ids": ids}))), max_length, strategy="bfd"))


def padding_free_collator(tokenizer: Any) -> Any:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)
