"""What each task's evaluation reports and which way each metric is better: plain tables that
import nothing of the core, so parameter checks, gates, leaderboards and reports share them."""

from __future__ import annotations

# Each metric and whether a bigger value is better: the gate `accuracy: 0.85` means "at least
# 0.85", `perplexity: 40` means "at most 40", and a leaderboard puts the better value first.
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "f1_macro": True,
    "precision": True,
    "recall": True,
    "eval_loss": False,
    "perplexity": False,
}

TASK_METRICS: dict[str, frozenset[str]] = {
    "sequence-classification": frozenset({"accuracy", "f1_macro", "precision", "recall"}),
    "causal-lm": frozenset({"eval_loss", "perplexity"}),
}

# What a variations leaderboard ranks by when the parameters do not say.
DEFAULT_RANK_METRIC: dict[str, str] = {"sequence-classification": "accuracy", "causal-lm": "eval_loss"}


def metrics_for_task(task: str) -> set[str]:
    """The metrics evaluation reports for `task`: gates naming others can never pass."""
    return set(TASK_METRICS[task])
