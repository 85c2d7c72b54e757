"""A file-based adapter registry: numbered versions per name, aliases, idempotent registration.

Layout under the registry root::

    <root>/<name>/index.json     versions, aliases and alias history (written atomically)
    <root>/<name>/v<N>/          a frozen copy of the adapter folder plus card.json

A version is keyed by the fingerprint of everything that produced it (dataset, resolved
config, base model, code), so registering the same inputs twice returns the existing
version. Each evaluation of a version is kept as a verdict on it (gates, metrics, passed, and the
promotion decision), and an alias moves only when `loraflow.promotion.decide` says so, decided under
the name's lock against the version the alias points at then: two runs promoting into one name at
once end with the one the rule prefers, and registering and moving the alias are one index write, so
a crash leaves both undone. A version folder deleted or half copied by hand is noticed
when it is read or registered again. Every read-modify-write of an index holds an exclusive file
lock, so concurrent runs never lose an update; the index is replaced atomically, so readers never
see half of it.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from loraflow.errors import ConfigError, RegistryError
from loraflow.fingerprint import hash_tree
from loraflow.layout import atomic_write_json, honour_umask
from loraflow.promotion import ApprovalAnswer, Champion, PromotionDecision, PromotionRequest, decide
from loraflow.settings import check_safe_name

# The aliases loraflow moves: a single or batch run's passing adapter, and a variations grid's winner.
PROMOTED_ALIAS = "production"
BEST_ALIAS = "best"


class Verdict(BaseModel):
    """One evaluation of a version against the gates in force then. A re-run of the same adapter
    under other gates adds a verdict rather than overwrite one: every record stays true."""

    number: int
    gates: dict[str, float] | None  # None: recorded before verdicts were, the gates are unknown
    passed: bool
    metrics: dict[str, Any] = Field(default_factory=dict)
    when: str
    flow_run_id: str | None = None
    promotion: PromotionDecision | None = None  # None: registered without an alias to decide on
    merged: str | None = None  # `export: merged`: the merged model the run wrote (a path; not copied here)


class RegistryVersion(BaseModel):
    name: str
    version: int
    key: str
    path: str
    created: str
    metrics: dict[str, Any] = Field(default_factory=dict)  # the latest verdict's
    passed: bool = False  # the latest verdict's
    verdict: int = 1  # the number of the latest verdict
    card: dict[str, Any] = Field(default_factory=dict)
    adapter_fingerprint: str | None = None  # the registered adapter's bytes: what a lost folder may be restored from
    files: dict[str, int] = Field(default_factory=dict)  # relative path -> size of the frozen copy
    verdicts: list[Verdict] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _first_verdict(cls, data: Any) -> Any:
        """A version indexed before verdicts were: its one recorded evaluation, gates unknown."""
        if isinstance(data, dict) and "verdicts" not in data:
            data = {**data, "verdicts": [{"number": 1, "gates": None, "passed": data.get("passed", False),
                                          "metrics": data.get("metrics", {}), "when": data.get("created", "")}]}
        return data

    def record(self, gates: dict[str, float] | None, passed: bool, metrics: dict[str, Any],
               flow_run_id: str | None, merged: str | None = None) -> Verdict:
        """This evaluation's verdict: the earlier one when gates and metrics are the same (an identical
        re-run), else a new one. The version's `passed` and `metrics` follow it; `merged` names the
        run's merged export, so a server can be pointed at the version's full model."""
        verdict = next((v for v in self.verdicts if (v.gates, v.passed, v.metrics) == (gates, passed, metrics)), None)
        if verdict is None:
            verdict = Verdict(number=len(self.verdicts) + 1, gates=gates, passed=passed, metrics=metrics,
                              when=_now(), flow_run_id=flow_run_id)
            self.verdicts.append(verdict)
        if merged is not None:
            verdict.merged = merged
        self.passed, self.metrics, self.verdict = verdict.passed, verdict.metrics, verdict.number
        return verdict

    @property
    def latest_verdict(self) -> Verdict | None:
        """The verdict `passed` and `metrics` follow: the latest evaluation's."""
        return self.verdicts[self.verdict - 1] if self.verdicts else None

    @property
    def decision(self) -> PromotionDecision | None:
        """The latest verdict's promotion decision."""
        return self.latest_verdict.promotion if self.latest_verdict else None

    def passing_verdict(self) -> Verdict:
        """The latest verdict that passed: what lets an alias point here."""
        for verdict in reversed(self.verdicts):
            if verdict.passed:
                return verdict
        raise ConfigError(
            f"registry: {self.name} v{self.version} never passed its gates ({len(self.verdicts)} verdict(s), "
            "all failed); an alias only points at a version that passed"
        )


class AliasMove(BaseModel):
    """Where an alias went, when, the passing verdict that allowed it, and who or what moved it."""

    version: int
    verdict: int
    when: str
    how: str  # "promote" | "rollback"
    previous: int | None = None
    flow_run_id: str | None = None
    comment: str | None = None  # a person's note, or the promotion decision's reason


class RegistryIndex(BaseModel):
    name: str
    versions: list[RegistryVersion] = Field(default_factory=list)
    aliases: dict[str, int] = Field(default_factory=dict)
    alias_history: dict[str, list[int]] = Field(default_factory=dict)  # earlier targets, for rollback
    alias_moves: dict[str, list[AliasMove]] = Field(default_factory=dict)

    def get(self, number: int) -> RegistryVersion:
        for version in self.versions:
            if version.version == number:
                return version
        raise ConfigError(f"registry: {self.name} has no version {number}")

    def move(self, alias: str, version: RegistryVersion, verdict: Verdict, how: str = "promote",
             flow_run_id: str | None = None, comment: str | None = None) -> AliasMove | None:
        """Point `alias` at `version`; None when it already pointed there."""
        previous = self.aliases.get(alias)
        if previous == version.version:
            return None
        if previous is not None and how == "promote":
            self.alias_history.setdefault(alias, []).append(previous)
        self.aliases[alias] = version.version
        move = AliasMove(version=version.version, verdict=verdict.number, when=_now(), how=how, previous=previous,
                         flow_run_id=flow_run_id, comment=comment)
        self.alias_moves.setdefault(alias, []).append(move)
        return move

    def champion(self, alias: str, candidate: RegistryVersion, offered: Champion | None) -> Champion | None:
        """The version `alias` points at as the candidate's rival: `offered` when the caller evaluated
        that very version on the candidate's test split; else its recorded metrics when it was
        evaluated on the same data with the same base model (the same split); else unavailable."""
        number = self.aliases.get(alias)
        if number is None:
            return None
        if offered is not None and offered.version == number:
            return offered
        held = self.get(number)
        for field, what in (("dataset_fingerprint", "other data"), ("model_identity", "another base model")):
            if held.card.get(field) is None or held.card.get(field) != candidate.card.get(field):
                return Champion(version=number, unavailable=f"its record is of {what} ({field} differs or is unknown) "
                                                            "and it was not evaluated on this run's test split")
        return Champion(version=number, metrics=held.passing_verdict().metrics)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def _entry(self, name: str) -> Path:
        return self.root / check_safe_name(name, "registry name")

    @contextmanager
    def _locked(self, name: str) -> Iterator[RegistryIndex]:
        """Hold the name's lock while the caller reads and changes its index; save on success."""
        entry = self._entry(name)
        entry.mkdir(parents=True, exist_ok=True)
        with open(entry / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                index = self._read(name)
                yield index
                atomic_write_json(entry / "index.json", index.model_dump())
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self, name: str) -> RegistryIndex:
        path = self._entry(name) / "index.json"
        if not path.exists():
            return RegistryIndex(name=name)
        return RegistryIndex.model_validate(json.loads(path.read_text(encoding="utf-8")))

    def index(self, name: str) -> RegistryIndex:
        return self._read(name)

    def damage(self, name: str, key: str) -> str | None:
        """What is wrong with the folder of the version registered for `key`; None when it is whole
        or nothing is registered for `key`. A cache key over it lets a damaged folder be restored."""
        version = next((v for v in self._read(name).versions if v.key == key), None)
        return self.problem(version) if version is not None else None

    def register(
        self,
        name: str,
        adapter_dir: str | Path,
        key: str,
        card: dict[str, Any],
        metrics: dict[str, Any],
        passed: bool,
        gates: dict[str, float] | None = None,
        alias: str | None = None,
        flow_run_id: str | None = None,
        promotion: PromotionRequest | None = None,
        merged: str | None = None,
    ) -> tuple[RegistryVersion, str]:
        """Find or add the version of `key` from `adapter_dir`, record this evaluation's verdict on
        it, and point `alias` at it when `promotion`'s rule says so (default: when the verdict
        passed), all under one lock and one index write. Returns the version (its `decision` says
        why) and `created`, `found` or `restored` (its folder was missing or incomplete and was copied
        again from `adapter_dir`, which holds the registered bytes)."""
        version, outcome, _ = self.register_and_promote(name, adapter_dir, key, card, metrics, passed, gates, alias,
                                                        flow_run_id, promotion, merged)
        return version, outcome

    def register_and_promote(
        self, name: str, adapter_dir: str | Path, key: str, card: dict[str, Any], metrics: dict[str, Any],
        passed: bool, gates: dict[str, float] | None = None, alias: str | None = None,
        flow_run_id: str | None = None, promotion: PromotionRequest | None = None, merged: str | None = None,
    ) -> tuple[RegistryVersion, str, AliasMove | None]:
        """`register`, also returning the alias move it made (None: the alias stayed), which is
        what says whether to announce a promotion. The alias is decided on only when it points
        elsewhere: a version it already names keeps its earlier decision."""
        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ConfigError(f"registry: {adapter_dir} holds no adapter (adapter_config.json missing)")
        fingerprint = hash_tree(adapter_dir)
        with self._locked(name) as index:
            version = next((v for v in index.versions if v.key == key), None)
            outcome = "found"
            if version is None:
                number = max((v.version for v in index.versions), default=0) + 1
                version = RegistryVersion(name=name, version=number, key=key, path="", created=_now(), card=card,
                                          adapter_fingerprint=fingerprint, verdicts=[])
                self._freeze(version, adapter_dir)
                index.versions.append(version)
                outcome = "created"
            elif problem := self.problem(version):
                if version.adapter_fingerprint not in (None, fingerprint):
                    raise RegistryError(
                        f"registry: {version.path} (v{version.version} of {name}) {problem}, and {adapter_dir} is "
                        f"not the adapter registered there; restore that folder from a backup, or remove "
                        f"v{version.version} from {self._entry(name) / 'index.json'} to register this adapter anew"
                    )
                self._freeze(version, adapter_dir)
                version.adapter_fingerprint = fingerprint
                outcome = "restored"
            verdict = version.record(gates, passed, metrics, flow_run_id, merged)
            move = None
            if alias is not None and index.aliases.get(alias) != version.version:
                request = promotion or PromotionRequest()
                verdict.promotion = decide(request, alias, verdict.passed, metrics,
                                           index.champion(alias, version, request.champion))
                if verdict.promotion.promote:
                    move = index.move(alias, version, verdict, flow_run_id=flow_run_id,
                                      comment=verdict.promotion.reason)
            return version, outcome, move

    def _freeze(self, version: RegistryVersion, adapter_dir: Path) -> None:
        """Copy the adapter and its card into `v<N>/` through a staging folder, so `v<N>` is whole or absent."""
        entry = self._entry(version.name)
        target = entry / f"v{version.version}"
        staging = Path(tempfile.mkdtemp(dir=entry, prefix=f".v{version.version}-"))
        honour_umask(staging, directory=True)
        # copyfile, not copy2: the copies get this process's umask, not the run folder's modes.
        shutil.copytree(adapter_dir, staging, dirs_exist_ok=True, copy_function=shutil.copyfile)
        atomic_write_json(staging / "card.json",
                          {"name": version.name, "version": version.version, "key": version.key, **version.card})
        if target.exists():  # never indexed (a crash between copy and index write), or found incomplete
            shutil.rmtree(target)
        staging.rename(target)
        version.path = str(target)
        version.files = {str(p.relative_to(target)): p.stat().st_size for p in sorted(target.rglob("*")) if p.is_file()}

    @staticmethod
    def problem(version: RegistryVersion) -> str | None:
        """What is wrong with a version's folder (deleted or half copied by hand), or None when whole."""
        path = Path(version.path)
        if not path.is_dir():
            return "is missing"
        for relative, size in (version.files or {"adapter_config.json": None, "card.json": None}).items():
            file = path / relative
            if not file.is_file():
                return f"lacks {relative}"
            if size is not None and file.stat().st_size != size:
                return f"holds {relative} of {file.stat().st_size} bytes, not the {size} registered"
        return None

    def promote(self, name: str, version: int, alias: str, flow_run_id: str | None = None,
                comment: str | None = None) -> AliasMove | None:
        """Point `alias` (e.g. `production`, `best`) at `version` by hand, remembering the previous
        target; None when it already pointed there. Only a version with a passing verdict can be promoted."""
        with self._locked(name) as index:
            target = index.get(version)
            return index.move(alias, target, target.passing_verdict(), flow_run_id=flow_run_id, comment=comment)

    def answer_approval(self, name: str, version: int,
                        answer: ApprovalAnswer) -> tuple[RegistryVersion, AliasMove | None]:
        """Turn `version`'s held promotion (`approval: required`) into the final one: approved, its
        alias moves to it in the same index write; rejected, the refusal is recorded on the verdict.
        A decision that is not waiting (answered before: a resumed run asks once) stays as it is."""
        with self._locked(name) as index:
            target = index.get(version)
            verdict = target.latest_verdict
            if verdict is None or verdict.promotion is None or not verdict.promotion.awaiting_approval:
                return target, None
            alias = verdict.promotion.alias
            verdict.promotion = verdict.promotion.answered(answer)
            move = None
            if answer.approved:
                move = index.move(alias, target, verdict, flow_run_id=answer.flow_run_id,
                                  comment=verdict.promotion.reason)
            return target, move

    def rollback(self, name: str, alias: str, flow_run_id: str | None = None,
                 comment: str | None = None) -> AliasMove | None:
        """Move `alias` back to the version it pointed at before the last promotion; the move says where."""
        with self._locked(name) as index:
            history = index.alias_history.get(alias) or []
            if not history:
                raise ConfigError(f"registry: alias {alias!r} of {name} has no earlier version to roll back to")
            target = index.get(history.pop())
            return index.move(alias, target, target.passing_verdict(), how="rollback", flow_run_id=flow_run_id,
                              comment=comment)

    def describe(self, action: str, name: str | None, first: str | None = None, second: str | None = None) -> str:
        """What the registry flow prints: every name (`list` without one), a name's versions (`list`),
        a version (`show`, and after `promote`/`rollback` the version the alias now names), or a diff."""
        if name is None:
            return "\n".join(self.names()) or f"{self.root}: no registry names yet"
        index = self._read(name)
        if action == "list":
            return list_text(index)
        if action == "diff":
            return diff_text(self.resolve(name, first), self.resolve(name, second))
        return show_text(index, self.resolve(name, first))

    def names(self) -> list[str]:
        """Every registry name under the root."""
        return sorted(p.parent.name for p in self.root.glob("*/index.json")) if self.root.is_dir() else []

    def resolve(self, name: str, alias_or_version: str | int) -> RegistryVersion:
        """The version an alias or number names, after checking its folder is whole."""
        index = self._read(name)
        number = index.aliases.get(str(alias_or_version), alias_or_version)
        version = next((v for v in index.versions if str(v.version) == str(number)), None)
        if version is None:
            raise ConfigError(f"registry: {name} has no version or alias {alias_or_version!r}")
        if problem := self.problem(version):
            raise RegistryError(
                f"registry: {version.path} (v{version.version} of {name}) {problem}; re-run the parameters that "
                "produced it to restore it from their adapter, or point the alias elsewhere (rollback)"
            )
        return version


class RegistryReport(BaseModel):
    """What the `registry` flow returns: the action's text and the alias move it made, if any."""

    action: str
    name: str | None
    output: str
    move: AliasMove | None = None

    def text(self) -> str:
        return self.output


def _metrics_text(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)) or "no metrics"


def list_text(index: RegistryIndex) -> str:
    """One line per version, newest first, with the aliases that point at it."""
    named: dict[int, list[str]] = {}
    for alias, number in index.aliases.items():
        named.setdefault(number, []).append(alias)
    lines = [f"{index.name}: {len(index.versions)} version(s)"]
    for version in reversed(index.versions):
        aliases = f"  <- {', '.join(sorted(named[version.version]))}" if version.version in named else ""
        verdict = "passed" if version.passed else "failed"
        lines.append(f"  v{version.version}  {verdict:<6}  {_metrics_text(version.metrics)}  {version.created[:19]}{aliases}")
    return "\n".join(lines)


def show_text(index: RegistryIndex, version: RegistryVersion) -> str:
    """A version's card, verdicts and promotion decisions, and every move of an alias to it."""
    lines = [f"{version.name} v{version.version}  {version.path}",
             f"  base model {version.card.get('base_model', '?')}, task {version.card.get('task', '?')}, "
             f"registered {version.created[:19]}, key {version.key[:16]}"]
    for verdict in version.verdicts:
        lines.append(f"  verdict {verdict.number}: {'passed' if verdict.passed else 'failed'} gates {verdict.gates}  "
                     f"{_metrics_text(verdict.metrics)}")
        if verdict.promotion is not None:
            lines.append(f"    {verdict.promotion.alias}: {'promoted' if verdict.promotion.promote else 'not promoted'}"
                         f" ({verdict.promotion.rule}): {verdict.promotion.reason}")
            if verdict.promotion.comparison:  # base, champion, candidate and delta, as the run's summary showed them
                lines.extend(f"      {row}" for row in verdict.promotion.table().splitlines())
    for alias, moves in index.alias_moves.items():
        for move in moves:
            if move.version == version.version:
                by = f" by flow run {move.flow_run_id}" if move.flow_run_id else ""
                note = f": {move.comment}" if move.comment else ""
                lines.append(f"  {alias} {move.how} {move.when[:19]} from v{move.previous}{by}{note}")
    return "\n".join(lines)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def diff_text(a: RegistryVersion, b: RegistryVersion) -> str:
    """The metrics of two versions side by side, and every card setting that differs between them."""
    lines = [f"{a.name}: v{a.version} -> v{b.version}", "  metric          a          b      delta"]
    for metric in dict.fromkeys([*a.metrics, *b.metrics]):
        left, right = a.metrics.get(metric), b.metrics.get(metric)
        if isinstance(left, (int, float)) and isinstance(right, (int, float)):
            lines.append(f"  {metric:<12} {left:>10.4f} {right:>10.4f} {right - left:>+10.4f}")
    card_a, card_b = _flat(a.card), _flat(b.card)
    changed = [key for key in dict.fromkeys([*card_a, *card_b]) if card_a.get(key) != card_b.get(key)]
    lines += [f"  {key}: {card_a.get(key)!r} -> {card_b.get(key)!r}" for key in changed] or ["  same settings"]
    return "\n".join(lines)
