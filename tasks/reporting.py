"""Publish a run's summary where Prefect users look: the run's Artifacts tab."""

from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact

from loraflow.report import RunResult, summary_markdown


def artifact_key(*parts: str) -> str:
    """Artifact keys may hold only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish_summary(result: RunResult) -> None:
    create_markdown_artifact(
        markdown=summary_markdown(result),
        key=artifact_key(result.name, "summary"),
        description=f"loraflow {result.name}: metrics, baseline, gates and timings",
    )
