"""Tokenised parquet shards as a torch dataset, and the padding collators that batch them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq
import torch
from torch.nn.utils.rnn import pad_sequence

from loraflow.data.tokenize import IGNORE_INDEX
from loraflow.errors import DataError
from loraflow.task_table import classifier

_COLUMNS = ("input_ids", "attention_mask", "labels")


class TokenizedDataset(torch.utils.data.Dataset):
    """Every row of the given shards, in shard order, held in memory as python lists.

    Rows stay unpadded: the collator pads each batch only to its own longest row.
    """

    def __init__(self, shard_paths: Sequence[str]):
        self.columns: dict[str, list[Any]] = {name: [] for name in _COLUMNS}
        for path in shard_paths:
            try:
                table = pq.read_table(path, columns=list(_COLUMNS))
            except (OSError, KeyError, ValueError) as error:
                raise DataError(f"{path}: not a tokenised shard: {str(error).splitlines()[0]}") from None
            for name in _COLUMNS:
                self.columns[name].extend(table.column(name).to_pylist())

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {name: values[index] for name, values in self.columns.items()}

    def num_tokens(self) -> int:
        """Non-padding tokens over all rows: the numerator of tokens/s."""
        return sum(sum(mask) for mask in self.columns["attention_mask"])


def collator_for(task: str, tokenizer):
    """A collate function for `task`: pad ids with the pad id, masks with 0, token labels with -100."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        tensors = [torch.tensor(row, dtype=torch.long) for row in rows]
        return pad_sequence(tensors, batch_first=True, padding_value=value)

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = [row["labels"] for row in features]
        return {
            "input_ids": pad([row["input_ids"] for row in features], pad_id),
            "attention_mask": pad([row["attention_mask"] for row in features], 0),
            "labels": torch.tensor(labels) if classifier(task) else pad(labels, IGNORE_INDEX),
        }

    return collate
