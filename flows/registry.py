"""registry: look at the adapter registry, promote a version, roll an alias back; from the
command line, the UI (the `registry/loraflow` deployment) or an automation.

    python flows/registry.py list [NAME]
    python flows/registry.py show NAME VERSION|ALIAS
    python flows/registry.py promote NAME VERSION [ALIAS]        # ALIAS: production
    python flows/registry.py rollback NAME [ALIAS]
    python flows/registry.py diff NAME A B
      options: --registry DIR (runs/registry), --comment TEXT

Every alias move is kept in the name's index.json with this flow run's id and the comment, and
emits `loraflow.model.promoted` or `loraflow.model.rolled-back`.
"""

from __future__ import annotations

import sys

from prefect import flow
from pydantic import ValidationError

from loraflow.config import RegistryParams, format_validation_error
from loraflow.registry import Registry, RegistryReport
from tasks.registry import move_alias_task

USAGE = __doc__.split("\n\n")[1]
POSITIONAL = {"list": ["name"], "show": ["name", "version"], "promote": ["name", "version", "alias"],
              "rollback": ["name", "alias"], "diff": ["name", "version", "other"]}


@flow(name="registry", description="List, show, promote, roll back and diff registered adapters.")
def registry(params: RegistryParams) -> RegistryReport:
    move = None
    if params.action in ("promote", "rollback"):
        move = move_alias_task(params.registry_dir, params.name, params.action, params.alias,
                               int(params.version) if params.version else None, params.comment)
    shown = params.alias if params.action == "rollback" else params.version
    text = Registry(params.registry_dir).describe(params.action, params.name, shown, params.other)
    return RegistryReport(action=params.action, name=params.name, output=text, move=move)


def parse_args(args: list[str]) -> RegistryParams:
    """`ACTION [positional ...] [--registry DIR] [--comment TEXT]` as the flow's parameters."""
    fields, words = {}, list(args)
    for option, field in (("--registry", "registry_dir"), ("--comment", "comment")):
        if option in words:
            at = words.index(option)
            if at + 1 >= len(words):
                raise ValueError(f"{option} needs a value")
            fields[field] = words.pop(at + 1)
            words.pop(at)
    if not words or words[0] not in POSITIONAL:
        raise ValueError(f"the first argument is the action: {', '.join(POSITIONAL)}")
    action, values = words[0], words[1:]
    if len(values) > len(POSITIONAL[action]):
        raise ValueError(f"{action} takes at most {len(POSITIONAL[action])} arguments: {' '.join(POSITIONAL[action])}")
    return RegistryParams.model_validate({"action": action, **dict(zip(POSITIONAL[action], values)), **fields})


def main(argv: list[str] | None = None) -> int:
    from flows.cli import run_in_terminal

    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in {"-h", "--help"}:
        print(USAGE)
        return 0
    try:
        params = parse_args(args)
    except ValidationError as error:
        print(f"error: {format_validation_error(error, 'registry', RegistryParams)}\n{USAGE}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: registry: {error}\n{USAGE}", file=sys.stderr)
        return 2
    return run_in_terminal(registry, params)


if __name__ == "__main__":
    raise SystemExit(main())
