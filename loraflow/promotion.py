"""Which alias a candidate adapter gets: one decision from its gate verdicts, its metrics, the
champion's (the version the alias points at now) and the base model's, under the rule in force.

Rules (`promote_if`):
    better   every compared metric beats the champion's by at least `min_improvement` in the metric's
             better direction (and at least one beats it), and none is worse than the base model's;
             with no champion, the same as `passes`. A champion that cannot be evaluated on this
             run's test split blocks promotion: only `passes` promotes on the gates alone.
    passes   every critical gate passed.
    never    register only.
The compared metrics are the gate metrics, or every known metric when no gate is set.
`approval: required` holds a promotion the rule allows until a person answers: `answered` turns
the held decision into the final one (approved: promote; rejected: record why not).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field

from loraflow.gates import Approval, GateVerdict
from loraflow.metrics import HIGHER_IS_BETTER

Rule = Literal["better", "passes", "never"]
HELD_FOR_APPROVAL = "; held for approval (approval: required)"


class Champion(BaseModel):
    """The version an alias points at, as this run sees it: its metrics on this run's test split,
    or why they cannot be had (its files are gone, another base model, other labels)."""

    version: int
    metrics: dict[str, Any] | None = None
    unavailable: str | None = None


class PromotionRequest(BaseModel):
    """What a run brings to the promotion decision besides its metrics; the registry adds the champion."""

    rule: Rule = "passes"
    min_improvement: float = Field(default=0.0, ge=0)
    approval: Approval = "none"
    verdicts: list[GateVerdict] = Field(default_factory=list)
    baseline: dict[str, Any] = Field(default_factory=dict)
    champion: Champion | None = None  # evaluated by the caller on this run's test split, when it did


class ComparisonRow(BaseModel):
    metric: str
    higher_is_better: bool
    base: float | None
    champion: float | None
    candidate: float | None
    delta: float | None  # candidate - champion


class ApprovalAnswer(BaseModel):
    """A person's answer to a held promotion, and where it came from."""

    approved: bool
    comment: str = ""
    flow_run_id: str | None = None  # the run that asked and received the answer
    when: str


class PromotionDecision(BaseModel):
    promote: bool
    alias: str
    rule: Rule
    reason: str  # one line
    champion: int | None = None  # the version compared against
    comparison: list[ComparisonRow] = Field(default_factory=list)
    awaiting_approval: bool = False  # the rule promotes, `approval: required` holds it for a person's answer
    approval: ApprovalAnswer | None = None  # that answer, once given

    def answered(self, answer: ApprovalAnswer) -> "PromotionDecision":
        """The final decision once a person answered the held one."""
        said = f" ({answer.comment})" if answer.comment else ""
        answer_text = ("approved" if answer.approved else "rejected") + said
        reason = f"{self.reason.removesuffix(HELD_FOR_APPROVAL)}; {answer_text}"
        return self.model_copy(update={"promote": answer.approved, "awaiting_approval": False, "approval": answer,
                                       "reason": reason})

    def approval_request(self, name: str, version: int) -> str:
        """What the person deciding sees (the Prefect UI's resume form): the question, the rule's
        reason and the comparison, as Markdown."""
        keeps = f"keeps it at v{self.champion}" if self.champion is not None else "leaves it unset"
        return "\n\n".join([
            f"### Promote {name} v{version} to `{self.alias}`?",
            f"The rule (`promote_if: {self.rule}`) would promote it: {self.reason.removesuffix(HELD_FOR_APPROVAL)}.",
            self.table(),
            f"**approve** moves `{self.alias}` to v{version}; **reject** {keeps}. Either way the answer and "
            "the comment are recorded on the version's verdict in the registry.",
        ])

    def table(self) -> str:
        """The comparison as Markdown: base, champion, candidate and delta per compared metric."""
        rows = [f"| {r.metric} | {_fmt(r.base)} | {_fmt(r.champion)} | {_fmt(r.candidate)} | {_fmt(r.delta, '+')} |"
                for r in self.comparison]
        champion = f"champion v{self.champion}" if self.champion is not None else "champion"
        return "\n".join([f"| metric | base | {champion} | candidate | delta |", "|---|---|---|---|---|", *rows])


def _fmt(value: float | None, sign: str = "") -> str:
    return "-" if value is None else f"{value:{sign}.4f}"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def _gain(metric: str, better: float, worse: float) -> float:
    """How much `better` beats `worse` in the metric's better direction (negative: it is worse)."""
    return better - worse if HIGHER_IS_BETTER[metric] else worse - better


def decide(request: PromotionRequest, alias: str, passed: bool, metrics: dict[str, Any],
           champion: Champion | None) -> PromotionDecision:
    """Promote or not, with the reason in one line and the comparison table."""
    compared = [v.metric for v in request.verdicts] or [m for m in HIGHER_IS_BETTER if _number(metrics.get(m)) is not None]
    theirs = (champion.metrics or {}) if champion else {}
    rows = [ComparisonRow(metric=m, higher_is_better=HIGHER_IS_BETTER[m], base=_number(request.baseline.get(m)),
                          champion=_number(theirs.get(m)), candidate=_number(metrics.get(m)), delta=None)
            for m in compared]
    for row in rows:
        if row.champion is not None and row.candidate is not None:
            row.delta = row.candidate - row.champion

    def decision(promote: bool, reason: str) -> PromotionDecision:
        held = promote and request.approval == "required"
        if held:
            promote, reason = False, reason + HELD_FOR_APPROVAL
        return PromotionDecision(promote=promote, alias=alias, rule=request.rule, reason=reason,
                                 champion=champion.version if champion else None, comparison=rows,
                                 awaiting_approval=held)

    if not passed:
        failed = [v.metric for v in request.verdicts if v.severity == "critical" and not v.passed]
        return decision(False, "critical gates failed" + (f": {', '.join(failed)}" if failed else ""))
    if request.rule == "never":
        return decision(False, "promote_if: never")
    if request.rule == "passes" or champion is None:
        return decision(True, "gates passed" + ("" if request.rule == "passes" else f"; no {alias} version yet"))
    if champion.unavailable:
        return decision(False, f"{alias} v{champion.version} cannot be evaluated: {champion.unavailable}; "
                               "promote_if: passes would promote on the gates alone")
    worse_than_base = [r.metric for r in rows if r.base is not None and r.candidate is not None
                       and _gain(r.metric, r.candidate, r.base) < 0]
    if worse_than_base:
        return decision(False, f"worse than the base model on {', '.join(worse_than_base)}")
    missing = [r.metric for r in rows if r.delta is None]
    if missing:
        return decision(False, f"{alias} v{champion.version} or this run has no {', '.join(missing)} to compare")
    gains = {r.metric: _gain(r.metric, r.candidate, r.champion) for r in rows}
    short = [f"{m} {gain:+.4f}" for m, gain in gains.items() if gain < request.min_improvement]
    if short or not any(gain > 0 for gain in gains.values()):
        what = ", ".join(short) or "no metric improves"
        return decision(False, f"not better than {alias} v{champion.version} by {request.min_improvement}: {what}")
    return decision(True, f"better than {alias} v{champion.version}: "
                          + ", ".join(f"{m} {gain:+.4f}" for m, gain in gains.items()))
