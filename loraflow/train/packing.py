"""`packing: true`: short examples packed into rows of up to `max_length` tokens, none attending to another.

TRL packs: `pack_dataset` (best-fit decreasing) fills rows with whole examples and records each row's
`seq_lengths`. How a batch of packed rows reaches the model depends on the attention kernel:

- flash-attention (CUDA) has varlen kernels: TRL's padding-free collator concatenates the batch into
  one row and passes `cu_seq_lens`, so no padding and no cross-example attention is computed.
- `sdpa` and `eager` (CPU, and CUDA by default) compute a dense mask over the whole row, so one
  concatenated row of `batch_size x max_length` tokens costs `batch_size` times the attention of the
  same rows side by side (measured: 0.77x the padded tokens/s on the CPU). `packed_batch_collator`
  keeps the packed rows as a batch: each row's position ids restart at 0 for every example and no
  attention mask is passed, so transformers builds a block-diagonal causal mask per row from the
  position ids. TRL's collator gives those position ids but always adds an all-ones attention mask
  in that mode, which would let examples see each other, so the mask is dropped here.
"""

from __future__ import annotations

from typing import Any

from loraflow.data.tokenize import IGNORE_INDEX


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


def packing_collator(tokenizer: Any, attn_implementation: str | None) -> Any:
    """The collator for packed rows under this attention kernel (see the module's docstring)."""
    if attn_implementation and "flash" in attn_implementation:
        return padding_free_collator(tokenizer)
    return packed_batch_collator(tokenizer)


def padding_free_collator(tokenizer: Any) -> Any:
    """TRL's: the batch as one row with `cu_seq_lens`, for flash-attention's varlen kernels."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=_pad_id(tokenizer), padding_free=True)


def packed_batch_collator(tokenizer: Any) -> Any:
    """Packed rows side by side, padded to the longest, with per-example position ids and no attention
    mask. Each example's first label is masked (it would be predicted from the previous example's last
    token); padding gets position 0, so each pad token is an example of its own with no label."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    with_positions = DataCollatorForLanguageModeling(pad_token_id=_pad_id(tokenizer), return_position_ids=True)

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = with_positions(examples)
        del batch["attention_mask"]
        batch["labels"][batch["position_ids"] == 0] = IGNORE_INDEX
        return batch

    return collate


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
