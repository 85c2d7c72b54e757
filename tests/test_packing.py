"""`packing: true`: packed, padding-free rows give every example the loss it has alone."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraflow.data.tokenize import IGNORE_INDEX
from loraflow.settings import LoraSettings, TrainingSettings
from loraflow.train.packing import packed_batch_collator, packed_row_count, packed_rows, padding_free_collator
from loraflow.train.request import TrainRequest
from loraflow.train.trainer import train_adapter
from tests.tiny_models import build_tiny_llama, causal_lm_rows, tiny_corpus, write_shard


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss of one row."""
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("collator", [packed_batch_collator, padding_free_collator])
def test_packed_examples_have_the_loss_they_have_alone(tmp_path, collator):
    corpus = tiny_corpus(12, seed=5)
    model_path = build_tiny_llama(tmp_path / "base", corpus)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    rows = causal_lm_rows(tokenizer, [" ".join(corpus[i:i + 1 + i % 3]) for i in range(9)])  # skewed lengths
    columns = {name: [row[name] for row in rows] for name in ("input_ids", "labels")}
    packed = packed_rows(columns, max_length=64)
    assert 1 < len(packed) < len(rows) and sum(map(sum, packed["seq_lengths"])) == sum(map(len, columns["input_ids"]))
    assert packed_row_count([len(ids) for ids in columns["input_ids"]], 64) == len(packed), "the dry run's count"
    examples = [packed[i] for i in range(len(packed))]
    batch = collator(tokenizer)(examples)
    assert "attention_mask" not in batch
    if collator is padding_free_collator:  # the batch flattened into one row
        assert batch["input_ids"].shape[0] == 1
        lengths_per_row = [[length for example in examples for length in example["seq_lengths"]]]
    else:  # the packed rows side by side, padded to the longest
        assert batch["input_ids"].shape == (len(packed), max(map(sum, packed["seq_lengths"])))
        lengths_per_row = [example["seq_lengths"] for example in examples]
    # every label is learnt once, but no example's first token (it would be predicted across a boundary)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(
        sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows)
    with torch.inference_mode():
        # use_cache=False as in training (the Trainer turns the cache off): with a cache, transformers
        # takes the rows for generation and does not split the attention at the examples' boundaries
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = {tuple(row["input_ids"]): example_losses(model(input_ids=torch.tensor([row["input_ids"]])).logits[0],
                                                         torch.tensor(row["labels"])) for row in rows}
    for row, lengths in enumerate(lengths_per_row):
        for start, stop in zip(itertools.accumulate(lengths, initial=0), itertools.accumulate(lengths)):
            ids = batch["input_ids"][row, start:stop]
            together = example_losses(logits[row, start:stop], ids)
            assert torch.allclose(together, alone.pop(tuple(ids.tolist())), atol=1e-4)
    assert not alone  # every example was in the packed rows exactly once


def test_training_with_packing_steps_over_packed_rows(tmp_path):
    corpus = tiny_corpus(40, seed=6)
    model_path = build_tiny_llama(tmp_path / "base", corpus)
    rows = causal_lm_rows(AutoTokenizer.from_pretrained(model_path), corpus)
    train = write_shard(tmp_path / "train.parquet", rows)
    settings = TrainingSettings(learning_rate=1e-2, num_epochs=2, batch_size=2, max_length=64, save_steps=100,
                                lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    request = TrainRequest(
        model_path=model_path, task="causal-lm", settings=settings, labels=None, train_shards=[train], eval_shards=[],
        checkpoint_dir=str(tmp_path / "ckpt"), adapter_dir=str(tmp_path / "model"), logs_dir=str(tmp_path / "logs"),
        packing=True,
    )
    packed = packed_rows({name: [row[name] for row in rows] for name in ("input_ids", "labels")}, 64)
    result = train_adapter(request, log=lambda message: None)
    assert len(packed) < len(rows) / 3
    assert result.global_step == 2 * math.ceil(len(packed) / 2) and result.train_loss is not None
