"""LoRA on a ~1B-parameter Llama-shaped model in bf16 on one GPU, through loraflow's child-process
launch: tokens/s, peak memory, and model FLOPs utilisation against the chip's measured bf16 rate.

    python benchmarks/gpu_training.py                 # on a GPU machine; appends to benchmarks/RESULTS.md
    python benchmarks/gpu_training.py --smoke         # a tiny model, also on the CPU: checks the path runs
    python benchmarks/gpu_training.py --results -     # print the section instead of appending it

Needs only loraflow's core and the torch, transformers and peft already installed (no Prefect,
no network): the model is built from a config with random weights and the data is random token
ids, so nothing is downloaded. Training runs exactly as the flows run it: `lease_devices` +
`run_training` (torchrun, one rank, the Trainer with peft inside), bf16 where the GPU has it.

MFU counts the FLOPs a LoRA step must do: forward 2N per token and the backward pass through
the frozen weights 2N (no weight gradients for them; LoRA's own are negligible), plus attention,
12 L S d per token (forward and backward, causal masking not discounted), divided by tokens/s
times the peak bf16 matmul rate measured on this chip (a large square matmul, not the datasheet).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BILLION = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000}  # the TinyLlama-1.1B shape
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512}


def measured_bf16_tflops(seconds: float = 3.0) -> float:
    """The chip's sustained bf16 matmul rate: repeated 8192x8192 products, timed with CUDA events."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        count += 10
    return 2 * n**3 * count / (time.perf_counter() - started) / 1e12


def build_model(folder: Path, shape: dict, max_length: int) -> int:
    """A Llama of `shape` with random weights and a word-level tokenizer, saved for loading by path."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**shape, max_position_embeddings=max_length, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, shape["vocab_size"])}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    return sum(parameter.numel() for parameter in model.parameters())


def random_shard(path: Path, rows: int, length: int, vocab: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, length), generator=generator).tolist()
    table = pa.table({"input_ids": ids, "attention_mask": [[1] * length] * rows, "labels": ids},
                     schema=pa.schema([("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())),
                                       ("labels", pa.list_(pa.int32()))]))
    pq.write_table(table, path)
    return str(path)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and a few steps; runs on the CPU too")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps to train (default 60)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--results", default=str(RESULTS), help="RESULTS.md to append to, or - to print")
    args = parser.parse_args(argv)

    import peft
    import torch
    import transformers

    from loraflow.devices import lease_devices
    from loraflow.settings import LoraSettings, TrainingSettings
    from loraflow.train.launch import run_training
    from loraflow.train.request import TrainRequest

    shape, steps, length = (TINY, 4, 64) if args.smoke else (BILLION, args.steps, args.max_length)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="loraflow-gpu-bench-") as work:
        root = Path(work)
        parameters = build_model(root / "model", shape, length)
        rows = steps * args.batch_size
        shard = random_shard(root / "train.parquet", rows, length, shape["vocab_size"])
        settings = TrainingSettings(
            learning_rate=1e-4, num_epochs=1, batch_size=args.batch_size, max_length=length, save_steps=10 * steps,
            logging_steps=max(1, steps // 6), lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear"),
        )
        request = TrainRequest(model_path=str(root / "model"), task="causal-lm", settings=settings, labels=None,
                               train_shards=[shard], eval_shards=[], checkpoint_dir=str(root / "checkpoints"),
                               adapter_dir=str(root / "adapter"), logs_dir=str(root / "logs"))
        started = time.perf_counter()
        with lease_devices(1, "gpu benchmark") as lease:
            result = run_training(request, lease, log=lambda line: print(line, flush=True))
        wall = time.perf_counter() - started

    tokens_per_second = result.tokens_per_second or 0.0
    layers, width = shape["num_hidden_layers"], shape["hidden_size"]
    flops_per_token = 4 * parameters + 12 * layers * length * width
    peak = measured_bf16_tflops() if cuda else None
    mfu = tokens_per_second * flops_per_token / (peak * 1e12) if peak else None
    device = torch.cuda.get_device_name(0) if cuda else platform.processor() or "CPU"
    lines = [
        f"\n## GPU training: {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n",
        f"- command: `python benchmarks/gpu_training.py{' --smoke' if args.smoke else ''}`",
        f"- device: {device}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
        f"- model: Llama-shaped, {parameters / 1e9:.2f}B parameters, {layers} layers, width {width}; LoRA r 16 on all "
        f"linear layers; batch {args.batch_size} x {length} tokens; {result.global_step} steps; precision {result.precision}",
        "",
        "| tokens/s | samples/s | train s | wall s (launch + load + train) | peak memory | measured bf16 peak | MFU |",
        "|---|---|---|---|---|---|---|",
        f"| {tokens_per_second:,.0f} | {result.samples_per_second or 0:.2f} | {result.train_runtime_s:.1f} | {wall:.1f} "
        f"| {(result.peak_memory_mb or 0) / 1024:.1f} GiB | {f'{peak:.0f} TFLOP/s' if peak else 'n/a (no GPU)'} "
        f"| {f'{mfu:.1%}' if mfu is not None else 'n/a'} |",
        "",
        f"- devices: {result.devices}; FLOPs per token counted: {flops_per_token / 1e9:.2f} GFLOP (4N + 12 L S d)",
    ]
    if args.smoke:
        lines.append("- smoke run: a tiny model; the figures say nothing about the target (MFU at least 40%)")
    text = "\n".join(lines) + "\n"
    if args.results == "-":
        print(text)
    else:
        with open(args.results, "a", encoding="utf-8") as handle:
            handle.write(text)
        print(text)
    print(json.dumps({"tokens_per_second": tokens_per_second, "mfu": mfu, "peak_memory_mb": result.peak_memory_mb}))
    return text


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
