"""`export: merged`: the base model with the adapter merged into its weights, for serving.

A server then loads one plain transformers checkpoint (`AutoModelForCausalLM.from_pretrained`) with
no peft at all, and its tokenizer renders conversations with the chat template training used.
"""

from __future__ import annotations

from pathlib import Path

from loraflow.layout import atomic_write_dir


def export_merged(model_path: str, adapter_dir: str, out_dir: str | Path) -> str:
    """Merge (`merge_and_unload`) in fp32 and save safetensors plus the adapter's tokenizer to `out_dir`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraflow.train.trainer import tokenizer_with_padding

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tokenizer = tokenizer_with_padding(adapter_dir)

    def write(staging: Path) -> None:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    return str(atomic_write_dir(out_dir, write))
