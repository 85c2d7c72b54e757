"""Batch: many datasets, each through the single pipeline, and one aggregate result.

`dataset_runs` turns the batch parameters into one `SingleParams` per dataset (the listed
ones, or every data file and subfolder of `datasets_dir`), refusing two datasets that
would share an output folder. `BatchResult` is `<output_dir>/<name>/batch_result.json`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError

from loraflow.config import BatchParams, DatasetSpec, SingleParams, check_dataset_names, format_validation_error
from loraflow.data.readers import FORMAT_BY_EXTENSION
from loraflow.errors import ConfigError, DataError
from loraflow.report import RunOutcome, outcome_line


def _dataset_paths(folder: str) -> list[Path]:
    """The datasets of a folder: each non-hidden subfolder, and each file of a known data format."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"datasets_dir: {folder!r} is not a folder; point it at a folder of datasets")
    paths = [
        path for path in sorted(root.iterdir())
        if not path.name.startswith(".") and (path.is_dir() or path.suffix.lower() in FORMAT_BY_EXTENSION)
    ]
    if not paths:
        raise DataError(
            f"datasets_dir: {folder!r} holds no datasets; add data files ({', '.join(FORMAT_BY_EXTENSION)}) "
            "or one subfolder per dataset"
        )
    return paths


def dataset_runs(params: BatchParams) -> list[SingleParams]:
    """One `single` parameter set per dataset, in order; names are checked unique."""
    if params.datasets:
        return [params.single_params(entry) for entry in params.datasets]
    paths = _dataset_paths(params.datasets_dir or "")
    try:
        runs = [params.single_params(DatasetSpec(path=str(path))) for path in paths]
        check_dataset_names([(f"datasets_dir: {p.name}", r.dataset.resolved_name) for p, r in zip(paths, runs)],
                            params.name)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, "dataset_options", SingleParams)) from None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return runs


class BatchResult(BaseModel):
    """Every dataset's status, timings, metrics, gate verdicts, adapter and registry version, or error."""

    name: str
    strategy: str
    datasets: list[RunOutcome]
    paths: dict[str, str]

    @property
    def failed(self) -> list[RunOutcome]:
        return [outcome for outcome in self.datasets if outcome.failed]

    @property
    def message(self) -> str:
        """The flow run's closing line: all passed, or which datasets failed (and which never started)."""
        total = len(self.datasets)
        if not self.failed:
            return f"{self.name}: all {total} datasets passed"
        failures = "; ".join(f"{outcome.name} ({outcome.reason})" for outcome in self.failed)
        skipped = [outcome.name for outcome in self.datasets if outcome.status == "skipped"]
        tail = f"; not started: {', '.join(skipped)}" if skipped else ""
        return f"{self.name}: {len(self.failed)} of {total} datasets failed: {failures}{tail}"

    def text(self) -> str:
        lines = [f"loraflow batch {self.name!r}: {len(self.datasets)} datasets, {self.strategy}"]
        width = max(len(outcome.name) for outcome in self.datasets)
        lines += [f"  {outcome_line(outcome, width)}" for outcome in self.datasets]
        return "\n".join([*lines, f"  {self.message}", *(f"  {what}: {path}" for what, path in self.paths.items())])
