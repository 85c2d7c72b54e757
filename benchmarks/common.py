"""Shared machinery of the benchmarks: child processes timed with their peak memory, variants
interleaved round by round, a local Prefect server, tables, and the RESULTS.md record.

Every figure a benchmark reports is a ratio against the plain alternative measured in the same
run: the machines are shared and noisy, so variants alternate (A, B, A, B ...), each in its
own process, and medians are compared. A child is the benchmark's own file started again with
`--child NAME ARGS_JSON`; it prints one `BENCH-RESULT {...}` line for the parent to read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from loraflow.layout import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS_PATH = REPO / "benchmarks" / "RESULTS.md"
DEMO_DATA = REPO / "loraflow" / "sample_data" / "topics.csv"
SINGLE_FLOW = REPO / "flows" / "single.py"
VARIATIONS_FLOW = REPO / "flows" / "variations.py"
RESULT_MARKER = "BENCH-RESULT "
# Peak memory is sampled every 0.2 s at most, and never for more than 2% of a core: reading the
# proportional set size of a torch process costs ~7 ms, and a tree of eight of them sampled every
# 0.2 s took a fifth of a core away from a run that kept both cores busy (a 2-slot grid).
MEMORY_SAMPLE_SECONDS = 0.2
MEMORY_SAMPLER_SHARE = 0.02
# Smoke runs train a few steps on a few rows: the paths run, the figures mean nothing.
SMOKE_OVERRIDES = {"num_epochs": 1, "batch_size": 8, "max_length": 32, "save_steps": 4, "logging_steps": 2}
SMOKE_ROWS = 60
# How a flow reaches Prefect: a running `prefect server start`, or the temporary server each run starts.
MODES = {"server": "running server", "temporary": "temporary server"}
_ENV_SHOWN = ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")


class BenchmarkError(RuntimeError):
    pass


@dataclass
class Measurement:
    """One child process: wall seconds, CPU seconds and peak memory of its whole process tree, its result.

    CPU seconds (user + system, the child and every descendant it waited for) vary less with the
    load of a shared machine than wall time (OpenMP threads spinning on a busy core still add some).
    """

    seconds: float
    peak_mb: float
    cpu_s: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)


def _tree_memory(root: psutil.Process) -> int:
    """Proportional set size of a process and its descendants (shared pages counted once)."""
    total = 0
    for process in (root, *root.children(recursive=True)):
        try:
            info = process.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(command: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None) -> tuple[Measurement, str]:
    """Run a command from the repository root; its wall time, sampled peak memory and stdout.

    The child gets its own session, so a timeout or Ctrl-C ends the whole tree it started
    (Dask workers, dataset map processes) and nothing else.
    """
    started, cpu_before = time.perf_counter(), _children_cpu()
    child = subprocess.Popen(
        list(command), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    peak, done = [0], threading.Event()

    def sample() -> None:
        root, pause = psutil.Process(child.pid), MEMORY_SAMPLE_SECONDS
        while not done.wait(pause):
            sampling = time.perf_counter()
            try:
                peak[0] = max(peak[0], _tree_memory(root))
            except psutil.NoSuchProcess:
                return
            pause = max(MEMORY_SAMPLE_SECONDS, (time.perf_counter() - sampling) / MEMORY_SAMPLER_SHARE)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except BaseException:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        raise
    finally:
        done.set()
        sampler.join()
    seconds, cpu = time.perf_counter() - started, _children_cpu() - cpu_before
    if child.returncode != 0:
        tail = "\n".join((stdout + stderr).strip().splitlines()[-25:])
        raise BenchmarkError(f"{' '.join(command[:4])} ... exited {child.returncode}:\n{tail}")
    return Measurement(seconds=seconds, peak_mb=peak[0] / 2**20, cpu_s=cpu), stdout


def run_child(script: str | Path, name: str, args: dict[str, Any], env: dict[str, str] | None = None) -> Measurement:
    """Run workload `name` of a benchmark file in a fresh interpreter and read its result."""
    command = [sys.executable, str(script), "--child", name, json.dumps(args)]
    measurement, stdout = run_measured(command, env)
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if not lines:
        raise BenchmarkError(f"child {name!r} printed no {RESULT_MARKER.strip()} line")
    measurement.result = json.loads(lines[-1][len(RESULT_MARKER):])
    return measurement


def serve_child(workloads: dict[str, Callable[[dict[str, Any]], dict[str, Any]]], argv: Sequence[str]) -> bool:
    """In a child (`--child NAME ARGS_JSON`): run the workload, print its result, return True."""
    if len(argv) < 3 or argv[0] != "--child":
        return False
    result = workloads[argv[1]](json.loads(argv[2]))
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return True


def say(line: str) -> None:
    print(line, flush=True)


def interleaved(variants: dict[str, Callable[[], Measurement]], repeat: int) -> dict[str, list[Measurement]]:
    """Each variant `repeat` times, alternating; the order rotates every round so no variant
    always runs first (cold caches) or right after the heaviest one."""
    names = list(variants)
    runs: dict[str, list[Measurement]] = {name: [] for name in names}
    for round_number in range(repeat):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            measurement = variants[name]()
            runs[name].append(measurement)
            say(f"  round {round_number + 1}/{repeat} {name}: {measurement.seconds:.1f}s "
                f"({measurement.cpu_s:.1f} CPU-s), peak {measurement.peak_mb:.0f} MB")
    return runs


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def child_environment(prefect_home: Path, api_url: str | None) -> dict[str, str]:
    """This environment, offline, with an isolated Prefect home; with `api_url` the children talk
    to that server, without it each flow starts Prefect's temporary local server."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    env.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def prefect_server(prefect_home: Path, api_url: str | None = None, timeout: float = 240) -> Iterator[str]:
    """The API URL of a running Prefect server: `api_url` when given, else a `prefect server
    start` of our own (its own home and database) that is stopped on exit."""
    if api_url:
        yield api_url
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = child_environment(prefect_home, None)
    log_file = open(prefect_home / "server.log", "w")  # noqa: SIM115 - closed below, after the server
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise BenchmarkError(f"prefect server did not start; see {prefect_home / 'server.log'}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log_file.close()


def mode_environments(prefect_home: Path, api_url: str, modes: Sequence[str]) -> dict[str, dict[str, str]]:
    """The children's environment per mode. For `temporary`, one throwaway flow first creates the
    temporary server's database, so no measured run pays for the migrations."""
    envs = {"server": child_environment(prefect_home, api_url), "temporary": child_environment(prefect_home, None)}
    if "temporary" in modes:
        run_measured([sys.executable, "-c", "from prefect import flow; flow(name='warm-up')(lambda: None)()"],
                     envs["temporary"])
    return envs


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(value, indent=2))


def single_params(output_dir: Path, args: argparse.Namespace, **changes: Any) -> dict[str, Any]:
    """`single` flow parameters: the bundled MiniLM demo (about a minute of training on two quiet
    cores), or a few rows and steps of it for a smoke run; `--overrides` go on top. No gates:
    they change no work."""
    dataset: dict[str, Any] = {"path": str(DEMO_DATA)}
    if args.smoke:
        dataset["max_rows"] = SMOKE_ROWS
    return {
        "dataset": dataset,
        "overrides": {**(SMOKE_OVERRIDES if args.smoke else {}), **args.overrides},
        "output_dir": str(output_dir),
        **changes,
    }


def run_flow(script: Path, params: dict[str, Any], params_path: Path, env: dict[str, str]) -> Measurement:
    """`python flows/<name>.py params.json`, exactly as a user runs it."""
    write_json(params_path, params)
    return run_measured([sys.executable, str(script), str(params_path)], env)[0]


def run_single_flow(params: dict[str, Any], params_path: Path, env: dict[str, str]) -> Measurement:
    """The `single` flow from the command line; the result is the run's result.json."""
    from loraflow.config import SingleParams

    measurement = run_flow(SINGLE_FLOW, params, params_path, env)
    name = SingleParams.model_validate(params).dataset.resolved_name
    measurement.result = json.loads((Path(params["output_dir"]) / name / "result.json").read_text())
    return measurement


def count_task_runs(api_url: str, name: str, state: str) -> int:
    """How many task runs named `name-...` the server holds in state `state` (e.g. Completed, Cached)."""
    body = {"task_runs": {"name": {"like_": name}, "state": {"name": {"any_": [state]}}}}
    request = urllib.request.Request(
        f"{api_url}/task_runs/count", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(json.loads(response.read()))


class Stopwatch:
    """Seconds per named stage of a plain script: `with stopwatch("train"): ...`."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = time.perf_counter() - started


def plain_run(params: dict[str, Any], registry_alias: str | None = None):
    """A checked `single` run to walk the stage lists without Prefect (`loraflow.pipeline.run_plain`)."""
    from loraflow.config import SingleParams
    from loraflow.pipeline import PipelineRun
    from loraflow.plan import plan_run

    return PipelineRun(plan_run(SingleParams.model_validate(params)), registry_alias=registry_alias)


def prepare_pipeline(params: dict[str, Any], timed: Stopwatch | None = None):
    """What the `single` flow does before training, with the core functions and no Prefect: the
    data stages through tokenisation (the same list the flow runs); the run holds the config and
    the training request."""
    from loraflow.pipeline import DATA_STAGES, run_plain, stages_through
    from loraflow.plan import write_resolved_config

    run = run_plain(stages_through(DATA_STAGES, "tokenize"), plain_run(params), timed or Stopwatch())
    write_resolved_config(run.config, run.plan.layout.config)
    return run


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return ", ".join(names)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def machine_description() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    packages = ", ".join(f"{name} {_version(name)}" for name in ("torch", "transformers", "peft", "prefect", "datasets"))
    env = ", ".join(f"{name}={os.environ.get(name, 'unset')}" for name in _ENV_SHOWN)
    return (
        f"{os.cpu_count()} cores ({usable} usable), {psutil.virtual_memory().total / 2**30:.1f} GiB, "
        f"{_cpu_model()}; {platform.system()} {platform.release()}; Python {platform.python_version()}; "
        f"{packages}; GPU: {gpu_name()}; {env}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(cell) for cell in headers], *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def comparison(runs: dict[str, list[Measurement]], reference: str,
               extra: dict[str, Callable[[list[Measurement]], str]] | None = None) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the usual table: per variant the median wall and CPU seconds, each as
    a ratio to the `reference` variant's median, any `extra` columns, peak memory and run count."""
    extra = extra or {}
    wall, cpu = (median([getattr(run, key) for run in runs[reference]]) for key in ("seconds", "cpu_s"))
    rows = []
    for name, measured in runs.items():
        seconds, cpu_seconds = (median([getattr(run, key) for run in measured]) for key in ("seconds", "cpu_s"))
        rows.append([name, f"{seconds:.1f}", ratio(seconds, wall), f"{cpu_seconds:.1f}", ratio(cpu_seconds, cpu),
                     *(column(measured) for column in extra.values()),
                     f"{median([run.peak_mb for run in measured]):.0f}", len(measured)])
    return ["variant", "wall s", "wall ratio", "CPU s", "CPU ratio", *extra, "peak MB", "runs"], rows


class Report:
    """What one benchmark run found: printed as it goes, appended to RESULTS.md at the end."""

    def __init__(self, title: str, target: str, script: str, argv: Sequence[str] | None):
        self.title, self.target = title, target
        arguments = sys.argv[1:] if argv is None else list(argv)
        self.command = shlex.join([".venv/bin/python", f"benchmarks/{Path(script).name}", *arguments])
        self.started = datetime.now(timezone.utc)
        self.load_at_start = load_average()
        self.tables: list[tuple[str, list[str], list[list[Any]]]] = []
        self.notes: list[str] = []

    def table(self, caption: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.tables.append((caption, list(headers), [list(row) for row in rows]))
        print(f"\n{caption}\n{markdown_table(headers, rows)}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def markdown(self) -> str:
        parts = [
            f"## {self.title}: {self.started:%Y-%m-%d %H:%M} UTC",
            "",
            f"- command: `{self.command}`",
            f"- machine: {machine_description()}",
            f"- load average (1, 5, 15 min): {self.load_at_start} at start, {load_average()} at end",
            f"- target: {self.target}",
        ]
        for caption, headers, rows in self.tables:
            parts += ["", caption, "", markdown_table(headers, rows)]
        if self.notes:
            parts += ["", *(f"- {text}" for text in self.notes)]
        return "\n".join(parts) + "\n"

    def append_to(self, path: Path) -> None:
        """Append this run's section; written whole to a temp file and renamed, like every loraflow file."""
        existing = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
        atomic_write_text(path, existing.rstrip("\n") + "\n\n" + self.markdown())
        print(f"\nappended to {path}")


def argument_parser(docstring: str, repeat: int, modes: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=docstring.strip().splitlines()[0])
    if modes:
        parser.add_argument("--modes", default=",".join(MODES), help=f"how flows reach Prefect: {', '.join(MODES)} (default all)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks the benchmark runs (figures mean nothing)")
    parser.add_argument("--repeat", type=int, default=None, help=f"rounds of interleaved runs (default {repeat}; 1 with --smoke)")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"Markdown file to append to (default {RESULTS_PATH.relative_to(REPO)}; none with --smoke)")
    parser.add_argument("--api-url", default=None, help="use this running Prefect server instead of starting one")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep run outputs here (default: a temporary folder, removed)")
    parser.add_argument("--overrides", type=json.loads, default={},
                        help='preset overrides for the demo runs, as JSON: \'{"num_epochs": 2}\' scales the training job')
    parser.set_defaults(default_repeat=repeat)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if hasattr(args, "modes"):
        args.modes = [mode for mode in args.modes.split(",") if mode]
        unknown = set(args.modes) - set(MODES)
        if unknown or not args.modes:
            parser.error(f"--modes: use {', '.join(MODES)}")
    if args.repeat is None:
        args.repeat = 1 if args.smoke else args.default_repeat
    if args.results is None and not args.smoke:
        args.results = RESULTS_PATH
    return args


@contextmanager
def work_dir(requested: Path | None) -> Iterator[Path]:
    """Where children write: the requested folder (kept), or a temporary one (removed)."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        yield requested.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Session:
    """One benchmark run's surroundings: a work folder, a running Prefect server, the children's
    environment per mode (`server`: that server; `temporary`: none) and fresh output folders."""

    work: Path
    api_url: str
    envs: dict[str, dict[str, str]]
    outputs: Iterator[Path]

    @property
    def env(self) -> dict[str, str]:
        return self.envs["server"]


@contextmanager
def session(args: argparse.Namespace) -> Iterator[Session]:
    with work_dir(args.work_dir) as work, prefect_server(work, args.api_url) as api_url:
        yield Session(work, api_url, mode_environments(work, api_url, getattr(args, "modes", ())), fresh_folders(work))


def fresh_folders(work: Path) -> Iterator[Path]:
    """`run-0`, `run-1`, ... under `work`: one per run, so no run finds another's outputs or cache."""
    return (work / f"run-{number}" for number in itertools.count())


def finish(report: Report, args: argparse.Namespace) -> Report:
    if args.results is not None:
        report.append_to(args.results)
    return report


def main_guard(main: Callable[[Sequence[str] | None], Any], workloads: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """The `__main__` of a benchmark file: a child workload when started with `--child`, else the
    benchmark, which stops its children and server on SIGTERM as on Ctrl-C."""
    if serve_child(workloads, sys.argv[1:]):
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with SIGINT ignored
    main(sys.argv[1:])
