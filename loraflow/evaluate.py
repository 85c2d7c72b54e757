"""Test-split metrics for an adapter or its baseline (gates live in loraflow.gates).

The baseline is the same base model without the adapter, evaluated the same way, so a
report can say how much the adapter helped and not only how good it is.

transformers and peft are imported inside the functions that use them, so importing
this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from loraflow.chat_eval import GenerationEval, generation_metrics
from loraflow.errors import DataError
from loraflow.task_table import classifier

_MAX_LOG_PERPLEXITY = 100.0  # exp(100) ~ 2.7e43: far past useless, still a finite JSON number


def load_for_inference(model_path: str, task: str, labels: list[str] | None, adapter_dir: str | None, seed: int = 42):
    """The base model (plus the adapter, when given) in eval mode on the picked device.

    Seeded first: without an adapter a classifier head is freshly initialised, and the
    baseline must be the same head every time.
    """
    from transformers import set_seed

    from loraflow.train.device import pick_device
    from loraflow.train.trainer import load_base_model, model_dtype

    plan = pick_device()
    set_seed(seed)
    model = load_base_model(model_path, task, labels, dtype=model_dtype(plan))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.to(plan.device).eval()


def evaluate_model(
    model_path: str,
    task: str,
    labels: list[str] | None,
    test_shards: list[str],
    adapter_dir: str | None,
    eval_batch_size: int = 64,
    seed: int = 42,
    generation: GenerationEval | None = None,
) -> dict:
    """Metrics of the adapter on `test_shards`, or of the baseline when `adapter_dir` is None; with
    `generation` (chat), also of answering the held-out conversations."""
    from loraflow.train.data import TokenizedDataset, collator_for
    from loraflow.train.trainer import tokenizer_with_padding

    data = TokenizedDataset(test_shards)
    if len(data) == 0:
        raise DataError(f"test split is empty ({len(test_shards)} shards)")
    model = load_for_inference(model_path, task, labels, adapter_dir, seed)
    tokenizer = tokenizer_with_padding(adapter_dir or model_path)
    loader = torch.utils.data.DataLoader(data, batch_size=eval_batch_size, collate_fn=collator_for(task, tokenizer))
    batches = _on_device(loader, model.device)
    if classifier(task):
        return _classification_metrics(model, batches, list(labels or []))
    metrics = _causal_lm_metrics(model, batches, len(data))
    if generation is not None:
        metrics.update(generation_metrics(model, tokenizer, generation))
    return metrics


def _on_device(loader, device) -> Iterator[dict[str, torch.Tensor]]:
    for batch in loader:
        yield {name: tensor.to(device) for name, tensor in batch.items()}


@torch.inference_mode()
def _classification_metrics(model, batches, labels: list[str]) -> dict:
    confusion = torch.zeros(len(labels), len(labels), dtype=torch.long)  # rows: true, columns: predicted
    for batch in batches:
        if int(batch["labels"].min()) < 0 or int(batch["labels"].max()) >= len(labels):
            raise DataError(f"test split has label ids outside 0..{len(labels) - 1} ({len(labels)} labels)")
        predicted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        pairs = batch["labels"].cpu() * len(labels) + predicted.cpu()
        confusion += torch.bincount(pairs, minlength=len(labels) ** 2).view(len(labels), len(labels))
    return classification_report(confusion.tolist(), labels)


def classification_report(confusion: list[list[int]], labels: list[str]) -> dict:
    """Accuracy and macro precision/recall/F1 from a confusion matrix (rows true, columns predicted).

    A class never predicted has precision 0 and one absent from the data has recall 0,
    so a model that ignores a class is not flattered.
    """
    total = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(len(labels)))
    precisions, recalls, f1s = [], [], []
    for i in range(len(labels)):
        predicted = sum(row[i] for row in confusion)
        actual = sum(confusion[i])
        precision = confusion[i][i] / predicted if predicted else 0.0
        recall = confusion[i][i] / actual if actual else 0.0
        precisions.append(precision)
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {
        "accuracy": correct / total if total else 0.0,
        "f1_macro": sum(f1s) / len(labels),
        "precision": sum(precisions) / len(labels),
        "recall": sum(recalls) / len(labels),
        "confusion_matrix": confusion,
        "labels": labels,
        "num_examples": total,
    }


@torch.inference_mode()
def _causal_lm_metrics(model, batches, num_examples: int) -> dict:
    """Mean loss per target token over the whole split (not per batch), and its perplexity."""
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]  # token t predicts token t+1
        loss_sum += torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        tokens += int((targets != -100).sum())
    if tokens == 0:
        raise DataError("test split has no target tokens (every label is -100)")
    eval_loss = loss_sum / tokens
    return {
        "eval_loss": eval_loss,
        "perplexity": math.exp(min(eval_loss, _MAX_LOG_PERPLEXITY)),
        "num_examples": num_examples,
    }
