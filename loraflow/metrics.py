"""What each task's evaluation reports and which way each metric is better: plain tables that
import nothing of the core but the task table, so parameter checks, gates, leaderboards and reports share them."""

from __future__ import annotations

from loraflow.task_table import TASK_TABLE

# Each metric and whether a bigger value is better: the gate `accuracy: 0.85` means "at least
# 0.85", `perplexity: 40` means "at most 40", and a leaderboard puts the better value first.
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "f1_macro": True,
    "precision": True,
    "recall": True,
    "eval_loss": False,
    "perplexity": False,
    "exact_match": True,  # chat: share of held-out last assistant turns generated exactly
    "rouge_l": True,  # chat: mean ROUGE-L F1 of those generations against the reference
}

TASK_METRICS: dict[str, frozenset[str]] = {name: frozenset(task.metrics) for name, task in TASK_TABLE.items()}

# What a variations leaderboard ranks by when the parameters do not say.
DEFAULT_RANK_METRIC: dict[str, str] = {name: task.rank_metric for name, task in TASK_TABLE.items()}


def metrics_for_task(task: str) -> set[str]:
    """The metrics evaluation reports for `task`: gates naming others can never pass."""
    return set(TASK_METRICS[task])
