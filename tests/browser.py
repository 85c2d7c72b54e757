"""Open a local page in real headless Chromium and say what a reader would see go wrong.

Driven over the DevTools protocol (a websocket; `websockets` comes with Prefect): the page is
loaded, then every console message of level error, uncaught exception and failed resource load is
collected, and a script reports each image's natural size (0 means it did not load).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--remote-debugging-port=0"]
PAGE_FACTS = """JSON.stringify({
  title: document.title,
  headings: [...document.querySelectorAll('h1, h2')].map(h => h.textContent.trim()),
  images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth,
                                          height: i.naturalHeight, shown: i.getBoundingClientRect().width})),
  tables: document.querySelectorAll('table').length,
  text: document.body.innerText.length,
})"""


def _devtools_port(profile: Path, process: subprocess.Popen, timeout: float) -> int:
    """Chromium writes its debugging port into the profile once it listens."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode} before it listened")
        lines = port_file.read_text().splitlines() if port_file.is_file() else []
        if len(lines) >= 2:
            return int(lines[0])
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


def check_page(path: str | Path, timeout: float = 120.0) -> dict:
    """`{"facts": {...}, "errors": [...]}` for the page at `path`, as headless Chromium renders it."""
    from websockets.sync.client import connect

    with tempfile.TemporaryDirectory(prefix="loraflow-chromium-") as profile:
        process = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port = _devtools_port(Path(profile), process, timeout)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
                page = next(target for target in json.load(answer) if target["type"] == "page")
            with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout) as socket:
                return _load_and_inspect(socket, Path(path).resolve().as_uri(), timeout)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _load_and_inspect(socket, url: str, timeout: float) -> dict:
    ids = itertools.count(1)
    errors: list[str] = []
    answers: dict[int, dict] = {}
    loaded = [False]

    def send(method: str, **params) -> int:
        message_id = next(ids)
        socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        return message_id

    def pump(until, deadline: float) -> None:
        while not until() and time.monotonic() < deadline:
            try:
                message = json.loads(socket.recv(timeout=max(0.05, deadline - time.monotonic())))
            except TimeoutError:
                return
            if "id" in message:
                answers[message["id"]] = message
                continue
            method, params = message.get("method"), message.get("params", {})
            if method == "Page.loadEventFired":
                loaded[0] = True
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                errors.append("exception: " + params["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")

    def evaluate(expression: str, wait: float):
        asked = send("Runtime.evaluate", expression=expression, returnByValue=True)
        pump(lambda: asked in answers, time.monotonic() + wait)
        return answers.get(asked, {}).get("result", {}).get("result", {}).get("value")

    deadline = time.monotonic() + timeout
    for method in ("Page.enable", "Runtime.enable", "Log.enable"):
        send(method)
    send("Page.navigate", url=url)
    # A busy machine can drop the load event, so the document itself is asked too, every second.
    is_loaded = f"document.readyState === 'complete' && location.href === {json.dumps(url)}"
    while not loaded[0]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"chromium did not finish loading {url}")
        pump(lambda: loaded[0], time.monotonic() + 1.0)
        loaded[0] = loaded[0] or evaluate(is_loaded, wait=10) is True
    pump(lambda: False, time.monotonic() + 1.0)  # late errors (a decode failure, a slow image)
    page_facts = evaluate(PAGE_FACTS, wait=30)
    if page_facts is None:
        raise TimeoutError(f"chromium did not answer about {url}")
    facts = json.loads(page_facts)
    return {"facts": facts, "errors": errors}
