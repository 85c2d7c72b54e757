"""Tiny real models and tokenised shards for tests: built offline in about a second.

`build_tiny_llama` makes a randomly initialised Llama with a BPE tokenizer trained on the
test corpus, saved like any hub checkpoint, so the causal-LM code paths run end to end
without downloading anything.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]

# Three topics a sentence encoder separates at once: a LoRA run of a few seconds learns them.
EASY_LABELS = ["sports", "food", "weather"]
_TOPIC_PHRASES = {
    "sports": ["the football match", "the tennis final", "the goalkeeper", "a basketball game", "the referee",
               "a late goal", "the marathon runner", "the cycling race"],
    "food": ["pasta with tomato", "a chocolate cake", "fresh bread", "the soup recipe", "grilled cheese",
             "a bowl of rice", "the pizza oven", "sweet apple pie"],
    "weather": ["heavy rain", "a sunny sky", "strong wind", "snow and ice", "the thunderstorm",
                "cloudy cold mornings", "the weather forecast", "a hot summer day"],
}
_TEMPLATES = ["I love {}", "today we talked about {}", "{} was amazing", "have you seen {}", "nothing beats {}"]


def easy_classification_examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` rows `{"text", "label"}` cycling through EASY_LABELS, phrased from fixed templates."""
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        label = EASY_LABELS[index % len(EASY_LABELS)]
        rows.append({"text": rng.choice(_TEMPLATES).format(rng.choice(_TOPIC_PHRASES[label])), "label": label})
    return rows


def tiny_corpus(n: int = 48, seed: int = 0) -> list[str]:
    """Short, repetitive sentences a 2-layer model can visibly learn in a few dozen steps."""
    rng = random.Random(seed)
    colours, animals, places = ["red", "blue", "green", "black"], ["cat", "dog", "bird"], ["mat", "roof", "bed"]
    return [
        f"the {rng.choice(colours)} {rng.choice(animals)} sat on the {rng.choice(places)}." for _ in range(n)
    ]


def build_tiny_llama(
    out_dir: str | Path, corpus: list[str], vocab_size: int = 400, chat_template: str | None = None,
    initializer_range: float = 0.02,
) -> str:
    """Train a byte-level BPE tokenizer on `corpus`, build a 2-layer Llama over it, save both to `out_dir`.
    With `chat_template`, the tokenizer ships it, with ChatML's turn markers as special tokens. A larger
    `initializer_range` gives the frozen output layer logits wide enough for LoRA to move the loss far."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + (CHATML_TOKENS if chat_template else []),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    # Like Llama's own tokenizer: bos in front, no eos (generation prompts must not end in eos).
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template:
        tokenizer.add_special_tokens({"additional_special_tokens": CHATML_TOKENS})
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            initializer_range=initializer_range,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def write_shard(path: str | Path, rows: list[dict[str, Any]]) -> str:
    """A tokenised shard in the data layer's format: unpadded input_ids, attention_mask, labels."""
    label_type = pa.list_(pa.int32()) if rows and isinstance(rows[0]["labels"], list) else pa.int64()
    schema = pa.schema(
        [("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())), ("labels", label_type)]
    )
    columns = {name: [row[name] for row in rows] for name in schema.names}
    pq.write_table(pa.table(columns, schema=schema), path)
    return str(path)


def classification_rows(tokenizer, examples: list[dict[str, str]], max_length: int = 32) -> list[dict]:
    """Tokenised `{"text", "label"}` examples, labels as ids into EASY_LABELS."""
    encoded = tokenizer([row["text"] for row in examples], truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": EASY_LABELS.index(row["label"])}
        for ids, mask, row in zip(encoded["input_ids"], encoded["attention_mask"], examples)
    ]


def causal_lm_rows(tokenizer, texts: list[str], max_length: int = 64) -> list[dict]:
    """Plain-text rows ending in eos; every token is a training target."""
    rows = []
    for text in texts:
        ids = (tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return rows


def chat_conversations(n: int = 36) -> list[dict[str, Any]]:
    """Up to 36 distinct OpenAI-style `{"messages"}` rows: where an animal sat, asked in three ways, the
    place following from the colour and the animal, so a tiny model can learn the answers."""
    colours, animals, places = ["red", "blue", "green", "black"], ["cat", "dog", "bird"], ["mat", "roof", "bed"]
    questions = ["where did the {} {} sit?", "tell me where the {} {} sat.", "the {} {} sat where?"]
    rows = []
    for question in questions:
        for c, colour in enumerate(colours):
            for a, animal in enumerate(animals):
                rows.append({"messages": [
                    {"role": "user", "content": question.format(colour, animal)},
                    {"role": "assistant", "content": f"the {colour} {animal} sat on the {places[(c + a) % 3]}."},
                ]})
    return rows[:n]
