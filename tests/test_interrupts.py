"""Interrupted and crowded runs, the way a user meets them: Ctrl-C in a terminal on a bare
`python flows/single.py`, a temporary server that dies mid-run, a run queued for a slot that is
cancelled, two runs of the same parameters at once, and slots whose release failed."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.states import Cancelling

from loraflow.errors import TrainingStopped
from loraflow.layout import LOCK_FILENAME, lock_run_folder
from loraflow.train.checkpoints import checkpoint_problem, find_resumable_checkpoint
from tests.production_stack import wait_for
from tests.test_cancellation import top_level_run
from tests.test_crash_resume import NAME, REPO, params_for, processes_mentioning, start_run, wait_for_checkpoint


def start_bare_run(params: dict, params_file: Path, prefect_home: Path) -> subprocess.Popen:
    """`python flows/single.py params.yaml` as a user starts it: no PREFECT_API_URL (Prefect's temporary
    server), in a session of its own so that a signal to its process group is a terminal's Ctrl-C."""
    params_file.write_text(yaml.safe_dump(params))
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(prefect_home), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(prefect_home / "results")})
    log = open(params_file.with_suffix(".log"), "w")
    return subprocess.Popen([sys.executable, str(REPO / "flows" / "single.py"), str(params_file)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)


def flow_run_states(prefect_home: Path) -> dict[str, tuple[str, str]]:
    """Each flow's run state and message, read from the temporary server's SQLite file once it is gone."""
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        rows = db.execute(
            "SELECT flow.name, flow_run.state_type, (SELECT message FROM flow_run_state WHERE flow_run_id = flow_run.id "
            "ORDER BY timestamp DESC LIMIT 1) FROM flow_run JOIN flow ON flow.id = flow_run.flow_id").fetchall()
    return {flow: (state_type, message or "") for flow, state_type, message in rows}


def bare_run_in_training(tmp_path: Path, limit: str):
    """A bare run of many epochs, once it has written its first checkpoint."""
    home, output_dir = tmp_path / "prefect-home", tmp_path / "runs"
    params = params_for(tmp_path, output_dir, limit=limit, num_epochs=30)
    run = start_bare_run(params, tmp_path / "first.yaml", home)
    wait_for_checkpoint(run, output_dir / NAME / "checkpoints", timeout=300)
    return home, output_dir, params, run


def ended_after(run: subprocess.Popen, action) -> tuple[int, float]:
    """The run's exit code after `action`, and the seconds it took to end."""
    action()
    started = time.monotonic()
    code = run.wait(timeout=180)
    return code, time.monotonic() - started


def last_line(log: Path) -> str:
    return log.read_text().strip().splitlines()[-1]


@pytest.mark.slow
def test_ctrl_c_on_a_bare_run_stops_at_a_checkpoint_in_seconds_a_second_ctrl_c_quits_at_once_and_reruns_resume(
        tmp_path):
    home, output_dir, params, run = bare_run_in_training(tmp_path, "gpu-ctrl-c")
    checkpoints = output_dir / NAME / "checkpoints"

    code, took = ended_after(run, lambda: os.killpg(run.pid, signal.SIGINT))  # a terminal's Ctrl-C: the whole group
    log = tmp_path / "first.log"
    assert code == 130, log.read_text()[-4000:]
    assert took < 30, f"took {took:.0f}s to stop"
    line = last_line(log)
    assert line.startswith("stopped: interrupted by SIGINT (Ctrl-C); training stopped on request at step "), line
    assert "ConnectError" not in log.read_text(), "the run never lost its server"
    step = int(line.split("at step ")[1].split()[0])
    kept = find_resumable_checkpoint(checkpoints, log=lambda message: None)
    assert kept == str(checkpoints / f"checkpoint-{step}") and checkpoint_problem(Path(kept)) is None
    time.sleep(1)
    assert processes_mentioning(str(output_dir / NAME / ".training")) == [], "training processes left behind"
    assert processes_mentioning(str(home)) == [], "the temporary server (or another process of the run) is left"
    states = flow_run_states(home)
    assert states["single"][0] == "CANCELLED" and states["single"][1] == line.removeprefix("stopped: ")
    assert states["train-evaluate"][0] == "CANCELLED", states
    assert not list((home / "loraflow-slot-holders").glob("*.json")), "the slot was given back"

    # The re-run resumes; a second Ctrl-C while it stops quits at once, leaving no process behind.
    rerun = start_bare_run(params, tmp_path / "second.yaml", home)
    wait_for_checkpoint_after(rerun, checkpoints, step)
    second = tmp_path / "second.log"
    assert f"resuming from checkpoint-{step} (step {step} of " in second.read_text()
    os.killpg(rerun.pid, signal.SIGINT)
    wait_for_text(rerun, second, "SIGINT (Ctrl-C): stopping at the next checkpoint; press Ctrl-C again to quit at once")
    code, took = ended_after(rerun, lambda: os.killpg(rerun.pid, signal.SIGINT))
    assert code == 130, second.read_text()[-4000:]
    assert took < 15, f"took {took:.0f}s to quit"
    assert last_line(second) == ("stopped: interrupted by SIGINT (Ctrl-C), then SIGINT (Ctrl-C) again: quit at once; "
                                 "the last complete checkpoint and finished stages are kept, run again to resume")
    time.sleep(1)
    assert processes_mentioning(str(output_dir / NAME / ".training")) == [], "training processes left behind"
    assert processes_mentioning(str(home)) == [], "the temporary server (or another process of the run) is left"
    later = int(Path(find_resumable_checkpoint(checkpoints, log=lambda message: None)).name.split("-")[1])
    holders = home / "loraflow-slot-holders"
    left = [json.loads(note.read_text())["pid"] for note in holders.glob("*.json")]
    assert left in ([], [rerun.pid]), "the slot was given back in the last seconds, or its note stays for the next run"

    # The next run gets the slot (giving it back for the run that quit, if that could not), resumes,
    # and stops on SIGTERM.
    third = start_bare_run(params, tmp_path / "third.yaml", home)
    wait_for_checkpoint_after(third, checkpoints, later)
    os.killpg(third.pid, signal.SIGTERM)
    assert third.wait(timeout=120) == 143
    text = (tmp_path / "third.log").read_text()
    if left:
        assert f"released the 'gpu-ctrl-c' slot of process {rerun.pid}, which died holding it" in text
    assert f"resuming from checkpoint-{later} (step {later} of " in text
    assert last_line(tmp_path / "third.log").startswith("stopped: interrupted by SIGTERM; training stopped")
    assert not list(holders.glob("*.json"))


def wait_for_text(process: subprocess.Popen, log: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.02)


def wait_for_checkpoint_after(process: subprocess.Popen, checkpoints: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find_resumable_checkpoint(checkpoints, log=lambda message: None)
        if found and int(Path(found).name.split("-")[1]) > step:
            return
        assert process.poll() is None, f"the run ended (exit {process.returncode})"
        time.sleep(0.1)
    raise AssertionError("no later checkpoint")


@pytest.mark.slow
def test_a_temporary_server_killed_mid_run_ends_it_in_bounded_time_and_the_next_run_gives_its_slot_back(tmp_path):
    home, output_dir, params, run = bare_run_in_training(tmp_path, "gpu-server-dies")
    checkpoints = output_dir / NAME / "checkpoints"

    servers = [pid for pid in processes_mentioning(str(home))
               if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(servers) == 1, servers
    code, took = ended_after(run, lambda: os.kill(servers[0], signal.SIGKILL))
    log = tmp_path / "first.log"
    assert code == 1, log.read_text()[-4000:]
    assert took < 60, f"took {took:.0f}s to end"
    line = last_line(log)
    assert line.startswith("error: the Prefect server at http://127.0.0.1:") and "stopped responding" in line, line
    assert "training stopped on request at step " in line and "run again to resume" in line, line
    assert "Traceback" not in log.read_text().split("stopped responding")[1]
    assert find_resumable_checkpoint(checkpoints, log=lambda message: None)
    time.sleep(1)
    assert processes_mentioning(str(output_dir / NAME / ".training")) == []
    notes = list((home / "loraflow-slot-holders").glob("*.json"))
    assert len(notes) == 1, "the slot could not be given back, so its note stays for the next run"

    rerun = start_bare_run(params, tmp_path / "second.yaml", home)
    assert rerun.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-4000:]
    second = (tmp_path / "second.log").read_text()
    assert "released the 'gpu-server-dies' slot of process" in second
    assert "resuming from checkpoint-" in second
    assert not list((home / "loraflow-slot-holders").glob("*.json"))


@pytest.mark.slow
def test_a_run_queued_for_a_slot_says_who_holds_it_and_a_cancel_ends_it_at_once(prefect_server, tmp_path):
    from orchestration.prefect_workarounds import slot_holders_dir

    limit, output_dir = "gpu-queued-cancel", tmp_path / "runs"
    holder = {"limit": limit, "run": "blocker", "host": socket.gethostname(), "pid": os.getpid(), "lease_id": None,
              "since": time.time(), "slots": 1}
    note = slot_holders_dir() / "blocker.json"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(limit, 1)
        client.increment_concurrency_slots(names=[limit], slots=1, mode="concurrency")  # a live holder's slot
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(json.dumps(holder))
        try:
            process = start_run(params_for(tmp_path, output_dir, limit=limit), tmp_path / "params.yaml")
            log = tmp_path / "params.log"
            deadline = time.monotonic() + 240
            while "waiting for 1 slot(s)" not in log.read_text():
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.2)
            run = top_level_run(client, output_dir)
            client.set_flow_run_state(run.id, Cancelling(message="cancelled by the test"), force=True)
            cancelled = time.monotonic()
            code = process.wait(timeout=60)
            took = time.monotonic() - cancelled
            final = client.read_flow_run(run.id).state
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
        finally:
            note.unlink(missing_ok=True)
            client.release_concurrency_slots(names=[limit], slots=1, occupancy_seconds=1)

    text = log.read_text()
    waiting = next(line for line in text.splitlines() if "waiting for 1 slot(s)" in line)
    assert f"held by: run 'blocker' (pid {os.getpid()} on {socket.gethostname()}, since " in waiting
    assert text.count("waiting for 1 slot(s)") == 1, "said once"
    assert code == 1 and took < 20, (code, took)
    assert "cancelled while waiting for a 'gpu-queued-cancel' slot; nothing was trained" in last_line(log)
    assert final.is_cancelled(), final
    train_evaluate = [r for r in children if r.name == NAME]
    assert len(train_evaluate) == 1 and train_evaluate[0].state.is_cancelled(), [r.state for r in children]
    assert "training on " not in text and not (output_dir / NAME / ".training").exists(), "no model was loaded"


def clock_seconds(log_line: str) -> float:
    hours, minutes, seconds = log_line[:12].split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def holds_folder(run: subprocess.Popen, folder: Path) -> bool:
    """Whether `run` holds the run folder's lock (the note in the lock file names its pid)."""
    assert run.poll() is None, f"the run ended before it held {folder} (exit {run.returncode})"
    lock = folder / LOCK_FILENAME
    return lock.exists() and f'"pid": {run.pid},' in lock.read_text()


@pytest.mark.slow
def test_a_second_run_of_the_same_parameters_waits_for_the_first_and_finds_its_work_cached(prefect_server, tmp_path):
    output_dir = tmp_path / "runs"
    params = params_for(tmp_path, output_dir, limit="gpu-two-runs", num_epochs=2)
    first = start_run(params, tmp_path / "first.yaml")
    # From its first stage on: the second run's start-up is shorter than what is left of the first.
    wait_for("the first run to hold its folder", lambda: holds_folder(first, output_dir / NAME), timeout=240,
             interval=0.05)
    second = start_run(params, tmp_path / "second.yaml")
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-4000:]
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-4000:]

    log = (tmp_path / "second.log").read_text()
    lines = log.splitlines()
    waiting = [line for line in lines if "is in use by run" in line]
    assert len(waiting) == 1 and f"{output_dir / NAME} is in use by run '{NAME}' (pid {first.pid} on " in waiting[0]
    # The folder is held for the whole run, not stage by stage: the second run waits before its first
    # stage, and its first stage ends only after the first run's training subflow (the last of its work).
    first_stage = next(line for line in lines if "| Task run '" in line)
    assert lines.index(waiting[0]) < lines.index(first_stage), log[-4000:]
    first_done = next(line for line in (tmp_path / "first.log").read_text().splitlines()
                      if f"Flow run '{NAME}' - Finished in state Completed()" in line)
    # Prefect's console lines start with the wall clock (HH:MM:SS.mmm): later within the hour, also across midnight
    assert 0 < (clock_seconds(first_stage) - clock_seconds(first_done)) % 86400 < 3600, (first_done, first_stage)
    result = json.loads((output_dir / NAME / "result.json").read_text())
    assert result["cached"]["train"] is True and result["cached"]["prepare"] is True, result["cached"]
    assert "resuming from checkpoint" not in log, "the second run never trained into the first one's checkpoints"


def test_the_run_folder_lock_names_its_holder_once_and_a_stop_ends_the_wait(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom loraflow.layout import lock_run_folder\n"
         "with lock_run_folder(sys.argv[1], 'first'):\n    print('held', flush=True)\n    time.sleep(60)\n",
         str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        said: list[str] = []
        asked = threading.Event()

        def should_stop() -> bool:
            if asked.is_set():
                return True
            asked.set()
            return False

        with pytest.raises(TrainingStopped, match="second: cancelled while waiting for .*run, which another run is writing"):
            with lock_run_folder(tmp_path / "run", "second", log=said.append, should_stop=should_stop):
                pass
        assert len(said) == 1 and f"is in use by run 'first' (pid {holder.pid} on {socket.gethostname()}" in said[0]
    finally:
        holder.kill()
        holder.wait()
    with lock_run_folder(tmp_path / "run", "third", log=said.append):  # the kernel dropped the dead holder's lock
        pass
    assert len(said) == 1


def test_the_run_folder_lock_is_re_entrant_for_its_run_only(tmp_path):
    """A flow holds its folder for the whole run and its stages hold it again: a nested hold in the same
    context (or a copy of it, as a subflow's thread gets) goes on; another run in this process (a batch's
    other dataset, a thread of its own) waits; a copy of the context kept after the hold ended holds nothing."""
    import contextvars

    folder, said = tmp_path / "run", []
    entered = threading.Event()

    def other_run() -> None:
        with lock_run_folder(folder, "other", log=said.append):
            entered.set()

    def same_run() -> None:
        with lock_run_folder(folder, "first", log=said.append):
            pass

    with lock_run_folder(folder, "first", log=said.append):
        with lock_run_folder(folder / ".." / "run", "first", log=said.append):  # the same folder, nested: no wait
            copied = contextvars.copy_context()
            in_copy = threading.Thread(target=copied.run, args=(same_run,))
            in_copy.start()
            in_copy.join(5)
            assert not in_copy.is_alive(), "a copy of the holder's context goes on"
        other = threading.Thread(target=other_run)
        other.start()
        time.sleep(1)
        assert not entered.is_set(), "another run in this process waits"
        assert len(said) == 1 and f"{folder} is in use by run 'first' (pid {os.getpid()} on " in said[0]
    other.join(5)
    assert entered.is_set() and not other.is_alive()
    stale = threading.Thread(target=copied.run, args=(other_run,))  # the hold that context knew has ended
    entered.clear()
    with lock_run_folder(folder, "third", log=said.append):
        stale.start()
        time.sleep(1)
        assert not entered.is_set(), "a stale copy of a context is no hold"
    stale.join(5)
    assert entered.is_set()


def test_a_slot_whose_release_failed_keeps_its_note_for_the_next_run(prefect_server, monkeypatch):
    """The server went away while the run held the slot: the note stays, so the next run can give it back."""
    import httpx
    from prefect.concurrency import _sync

    from orchestration.prefect_workarounds import slot_holders_dir
    from orchestration.slots import training_slots

    limit = "gpu-release-fails"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(limit, 1)
    said: list[str] = []
    with training_slots(limit, 1, run="held", log=said.append):
        notes = [n for n in slot_holders_dir().glob("*.json") if json.loads(n.read_text())["limit"] == limit]
        assert len(notes) == 1 and json.loads(notes[0].read_text())["run"] == "held"

        def unreachable(lease_id):
            raise httpx.ConnectError("All connection attempts failed")

        monkeypatch.setattr(_sync, "release_concurrency_slots_with_lease", unreachable)
    assert notes[0].exists(), "the note must outlive a failed release"
    assert "could not give back the 'gpu-release-fails' slot" in said[-1]
    notes[0].unlink()
    with get_client(sync_client=True) as client:  # the slot the failed release left taken
        client.release_concurrency_slots(names=[limit], slots=1, occupancy_seconds=1)


def test_a_bare_run_uses_a_prefect_server_already_running_at_the_local_address(prefect_server, tmp_path):
    """`python flows/single.py` with no PREFECT_API_URL joins a server that answers at the default
    local address (here: the session's, named through LORAFLOW_LOCAL_SERVER_URL) instead of starting
    a temporary one, and says so."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    params = params_for(tmp_path, tmp_path / "runs", limit="gpu-running-server-test")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(LORAFLOW_USE_RUNNING_SERVER="1", LORAFLOW_LOCAL_SERVER_URL=url)
    done = subprocess.run([sys.executable, str(REPO / "flows" / "single.py"), str(tmp_path / "params.yaml"), "--plan"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"using the Prefect server already running at {url}" in done.stderr
    assert "Starting temporary server" not in done.stderr + done.stdout
    with get_client(sync_client=True) as client:
        assert top_level_run(client, tmp_path / "runs").state.is_completed()


@pytest.mark.slow
def test_a_configured_server_that_dies_mid_run_ends_it_in_bounded_time(tmp_path):
    """PREFECT_API_URL names a real `prefect server start`; killed mid-training, the bare run stops at a
    checkpoint and ends with one line naming the server, instead of retrying its calls for minutes."""
    from benchmarks.common import _free_port, _healthy, child_environment

    home, output_dir = tmp_path / "server-home", tmp_path / "runs"
    home.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=child_environment(home, None), stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not _healthy(url):
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.5)
        params = params_for(tmp_path, output_dir, limit="gpu-configured-server-dies", num_epochs=30)
        (tmp_path / "first.yaml").write_text(yaml.safe_dump(params))
        env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(tmp_path / "client-home")}
        log = open(tmp_path / "first.log", "w")
        run = subprocess.Popen([sys.executable, str(REPO / "flows" / "single.py"), str(tmp_path / "first.yaml")],
                               stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        wait_for_checkpoint(run, output_dir / NAME / "checkpoints", timeout=300)
        code, took = ended_after(run, lambda: os.killpg(server.pid, signal.SIGKILL))
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait()
    text = (tmp_path / "first.log").read_text()
    assert code == 1, text[-4000:]
    assert took < 60, f"took {took:.0f}s to end"
    line = last_line(tmp_path / "first.log")
    assert line.startswith(f"error: the Prefect server at http://127.0.0.1:{port} stopped responding"), line
    assert "run again to resume" in line, line
    assert find_resumable_checkpoint(output_dir / NAME / "checkpoints", log=lambda message: None)
    time.sleep(1)
    assert processes_mentioning(str(output_dir / NAME / ".training")) == []
