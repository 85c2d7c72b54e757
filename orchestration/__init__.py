"""Prefect glue that runs the pipeline but defines no task: how a flow runs its stages
(`stages`), the dry run (`dry_run`), what a run shows (`reporting`, `events`), training on the
GPU pool (`dispatch`), device slots (`slots`), and the workarounds for Prefect's temporary server
and cancellation (`prefect_workarounds`). The tasks themselves are in `tasks/`."""
