"""Run the sample prompts through a trained adapter, so a person can see what it does."""

from __future__ import annotations

import torch

from loraflow.chat import end_of_turn, generation_case
from loraflow.chat_eval import generate_reply, last_question
from loraflow.errors import DataError
from loraflow.evaluate import load_for_inference
from loraflow.layout import atomic_write_jsonl, read_jsonl
from loraflow.task_table import TASK_TABLE, classifier
from loraflow.train.trainer import tokenizer_with_padding


def run_sample_prompts(
    model_path: str,
    task: str,
    labels: list[str] | None,
    adapter_dir: str | None,
    prompts_path: str,
    out_path: str,
    max_length: int,
    max_new_tokens: int,
) -> list[dict]:
    """Classify each `{"text", "label"}` row, greedily continue each `{"prompt", "input", "reference"}`
    row from its `input` (the prompt in training format), or answer each `{"messages"}` row's last
    assistant turn in the chat template the adapter's tokenizer was saved with."""
    try:
        rows = read_jsonl(prompts_path)
    except ValueError as error:
        raise DataError(f"{prompts_path}: not valid JSONL: {error}") from None
    tokenizer = tokenizer_with_padding(adapter_dir or model_path)
    model = load_for_inference(model_path, task, labels, adapter_dir)
    with torch.inference_mode():
        if classifier(task):
            results = [_classify(model, tokenizer, row, list(labels or []), max_length) for row in rows]
        elif TASK_TABLE[task].rows == "conversation":
            results = [_answer(model, tokenizer, row, max_length, max_new_tokens) for row in rows]
        else:
            results = [_generate(model, tokenizer, row, max_length, max_new_tokens) for row in rows]
    atomic_write_jsonl(out_path, results)
    return results


def _classify(model, tokenizer, row: dict, labels: list[str], max_length: int) -> dict:
    inputs = _encode(tokenizer, row["text"], max_length, model.device)
    probabilities = model(**inputs).logits[0].float().softmax(-1).tolist()
    return {
        "text": row["text"],
        "label": row.get("label"),
        "predicted": labels[probabilities.index(max(probabilities))],
        "scores": dict(zip(labels, probabilities)),
    }


def _generate(model, tokenizer, row: dict, max_length: int, max_new_tokens: int) -> dict:
    """Greedy, one prompt at a time: no padding side to get wrong, and sample sets are small."""
    inputs = _encode(tokenizer, row.get("input", row["prompt"]), max_length, model.device)
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    continuation = output[0, inputs["input_ids"].shape[1]:]
    return {
        "prompt": row["prompt"],
        "reference": row.get("reference"),
        "generated": tokenizer.decode(continuation, skip_special_tokens=True),
    }


def _answer(model, tokenizer, row: dict, max_length: int, max_new_tokens: int) -> dict:
    template = tokenizer.chat_template
    prompt, reference = generation_case(tokenizer, row["messages"], template)
    generated = generate_reply(model, tokenizer, prompt, end_of_turn(tokenizer, template), max_new_tokens, max_length)
    return {"prompt": last_question(row["messages"]), "reference": reference, "generated": generated}


def _encode(tokenizer, text: str, max_length: int, device) -> dict:
    """The two inputs training saw (no token_type_ids), as one-row tensors on `device`."""
    encoded = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
    return {name: encoded[name].to(device) for name in ("input_ids", "attention_mask")}
