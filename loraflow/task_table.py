"""What differs between tasks, in one table the rest of the code asks instead of comparing task names.

A task is a row form (what preparation reads), a model head (which Auto class and peft task type train
it), the metrics its evaluation reports, the metric a leaderboard ranks by, and its default preset.
Plain data that imports nothing of the core, so the parameter models, metrics and data layers all
build on it; adding a task starts with one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskDef:
    rows: str  # "labelled_text": text + class label; "text": plain text or prompt/completion; "conversation"
    head: str  # "classifier": AutoModelForSequenceClassification (peft SEQ_CLS); "causal-lm": AutoModelForCausalLM
    metrics: tuple[str, ...]
    rank_metric: str
    default_preset: str


TASK_TABLE: dict[str, TaskDef] = {
    "sequence-classification": TaskDef(
        rows="labelled_text", head="classifier", metrics=("accuracy", "f1_macro", "precision", "recall"),
        rank_metric="accuracy", default_preset="classification-small",
    ),
    "causal-lm": TaskDef(
        rows="text", head="causal-lm", metrics=("eval_loss", "perplexity"), rank_metric="eval_loss",
        default_preset="causal-lm-llama",
    ),
    "chat": TaskDef(
        rows="conversation", head="causal-lm", metrics=("eval_loss", "perplexity", "exact_match", "rouge_l"),
        rank_metric="eval_loss", default_preset="chat-llama",
    ),
}


def classifier(task: str) -> bool:
    """Whether `task` trains a classification head on class ids (else a causal LM on token labels)."""
    return TASK_TABLE[task].head == "classifier"
