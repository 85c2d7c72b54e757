"""Packing: tokens per second of `packing: true` against padded batches on chat data of skewed lengths.

    .venv/bin/python benchmarks/packing.py            # 3 rounds
    .venv/bin/python benchmarks/packing.py --smoke    # a tiny model, a few conversations

A Llama-shaped model with random weights and a word-level tokenizer carrying ChatML's turn markers is
built from a config (nothing is downloaded), and a conversation set is generated where most answers are
short and a few are long, as in real chat data. The data stages of the `single` flow (`task: chat`,
`chat_template: chatml`, assistant-only loss) prepare and tokenise it once, with the core functions;
each training is then `train_adapter` in a fresh process on the same shards and settings, either
padded (every batch padded to its longest row) or packed (`packing: true`: rows of up to `max_length`
tokens side by side, each example with its own position ids and no attention across examples). Tokens/s counts real tokens, so padding is not counted as work. The loss match
is the largest difference between an example's summed loss inside a packed row and alone, on the base
model, over the first training rows.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/<file>.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bench

TARGET = "packing: true at least 1.5x the tokens/s of padded batches, each example's loss equal within 1e-4"
SHAPES = {  # (hidden, intermediate, layers, heads), conversations, max_length, batch_size
    "smoke": ((32, 64, 1, 2), 24, 64, 4),
    "full": ((128, 256, 2, 4), 480, 512, 8),
}
WORDS = 200


def build_model(folder: Path, shape: tuple[int, int, int, int], max_length: int) -> str:
    """A random Llama over a word-level vocabulary (`w0` .. and the ChatML role names and markers)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from loraflow.chat import CHATML

    names = ["<pad>", "<s>", "</s>", "<unk>", "system", "user", "assistant", *(f"w{i}" for i in range(WORDS))]
    word_level = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    hidden, intermediate, layers, heads = shape
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def skewed_conversations(path: Path, count: int, max_length: int) -> Path:
    """OpenAI-style rows: nine in ten answers of 4-24 words, one in ten of up to ~3/4 of `max_length`."""
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(n))

    rows = [{"messages": [{"role": "user", "content": words(rng.randint(3, 8))},
                          {"role": "assistant", "content": words(rng.randint(4, 24) if i % 10 else
                                                                 rng.randint(max_length // 2, 3 * max_length // 4))}]}
            for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def train(args: dict[str, Any]) -> dict[str, Any]:
    """One training on the prepared shards, padded or packed."""
    from loraflow.train.request import TrainRequest
    from loraflow.train.trainer import train_adapter

    out = Path(args["out"])
    request = TrainRequest.model_validate(args["request"]).model_copy(update={
        "packing": args["packing"], "checkpoint_dir": str(out / "checkpoints"), "adapter_dir": str(out / "model"),
        "logs_dir": str(out / "logs"),
    })
    result = train_adapter(request, log=lambda line: None)
    return {"tokens_per_second": result.tokens_per_second, "samples_per_second": result.samples_per_second,
            "steps": result.global_step, "runtime": result.train_runtime_s}


def loss_match(args: dict[str, Any]) -> dict[str, Any]:
    """Largest |summed loss of an example inside a packed row - its summed loss alone|, on the base model,
    with the packed batch collated as training collates it."""
    import itertools

    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from loraflow.data.tokenize import IGNORE_INDEX, load_tokenizer
    from loraflow.train.packing import packed_rows, packing_collator

    rows = pq.read_table(args["shard"], columns=["input_ids", "labels"]).to_pylist()[: args["examples"]]
    model = AutoModelForCausalLM.from_pretrained(args["model"]).eval()
    packed = packed_rows({name: [row[name] for row in rows] for name in ("input_ids", "labels")}, args["max_length"])
    examples = [packed[i] for i in range(len(packed))]
    batch = packing_collator(load_tokenizer(args["model"]), model.config._attn_implementation)(examples)
    lengths_per_row = [example["seq_lengths"] for example in examples] if batch["input_ids"].shape[0] > 1 else \
        [[length for example in examples for length in example["seq_lengths"]]]

    def summed(logits: torch.Tensor, labels: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX,
                                                       reduction="sum"))

    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = {tuple(row["input_ids"]): summed(model(input_ids=torch.tensor([row["input_ids"]])).logits[0],
                                                 torch.tensor(row["labels"])) for row in rows}
        gaps = []
        for row, lengths in enumerate(lengths_per_row):
            for start, stop in zip(itertools.accumulate(lengths, initial=0), itertools.accumulate(lengths)):
                ids = tuple(batch["input_ids"][row, start:stop].tolist())
                gaps.append(abs(summed(logits[row, start:stop], batch["labels"][row, start:stop]) - alone[ids]))
    return {"max_gap": max(gaps), "examples": len(gaps), "packed_rows": len(packed)}


def main(argv: Sequence[str] | None = None) -> bench.Report:
    args = bench.parse_arguments(bench.argument_parser(__doc__, repeat=3), argv)
    report = bench.Report("Packing", TARGET, __file__, argv)
    shape, count, max_length, batch_size = SHAPES["smoke" if args.smoke else "full"]
    with bench.session(args) as session:
        model = build_model(session.work / "base", shape, max_length)
        params = {
            "dataset": {"path": str(skewed_conversations(session.work / "chats.jsonl", count, max_length))},
            "task": "chat", "model": model, "chat_template": "chatml", "output_dir": str(session.work / "data"),
            "overrides": {"num_epochs": 1, "batch_size": batch_size, "max_length": max_length, "save_steps": 10_000,
                          "logging_steps": 10_000, **args.overrides},
        }
        data = bench.prepare_pipeline(params)
        request = data.request.model_dump(mode="json")

        def variant(packing: bool):
            return lambda: bench.run_child(__file__, "train", {"request": request, "packing": packing,
                                                               "out": str(next(session.outputs))}, session.env)

        runs = bench.interleaved({"padded batches": variant(False), "packing: true": variant(True)}, args.repeat)
        match = bench.run_child(__file__, "loss-match", {
            "shard": data.request.train_shards[0], "model": model, "max_length": max_length, "examples": 24,
        }, session.env).result
    reference = bench.median([run.result["tokens_per_second"] for run in runs["padded batches"]])
    rows = []
    for name, measured in runs.items():
        tokens = bench.median([run.result["tokens_per_second"] for run in measured])
        rows.append([name, f"{tokens:,.0f}", bench.ratio(tokens, reference),
                     f"{bench.median([r.result['samples_per_second'] for r in measured]):.1f}",
                     measured[0].result["steps"], f"{bench.median([r.result['runtime'] for r in measured]):.1f}",
                     f"{bench.median([r.peak_mb for r in measured]):.0f}", len(measured)])
    hidden, _, layers, _ = shape
    report.table(
        f"Chat LoRA training, {data.config.train_rows} conversations (one in ten long), max_length {max_length}, "
        f"batch {batch_size}, Llama {layers} layers x {hidden}, medians of rounds:",
        ["variant", "tokens/s", "vs padded", "samples/s", "steps", "train s", "peak MB", "runs"],
        rows,
    )
    report.note(f"loss match: largest |packed - alone| of an example's summed loss, {match['examples']} examples in "
                f"{match['packed_rows']} packed rows: {match['max_gap']:.2e}")
    report.note("samples/s counts packed rows when packing; tokens/s counts real tokens on both sides")
    if args.smoke:
        report.note("smoke run: a tiny model and a few conversations; the ratios say nothing about the target")
    return bench.finish(report, args)


if __name__ == "__main__":
    bench.main_guard(main, {"train": train, "loss-match": loss_match})
