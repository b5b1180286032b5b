"""The status page in a real headless Chromium, driven over WebDriver (chromedriver), phone-sized."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from conftest import PY
from servicekit import Service, need_tool, service_config

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

#: What this closed network needs (the machine notes): no sandbox as root, and no background
#: connections to Google's services, which are refused here.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=390,844",
]  # fmt: skip

PIPELINE = f"""
    [[sources]]
    name = "in"
    type = "directory"
    path = "in"
    settle = "0s"
    poll_interval = "0.1s"
    route = ["extract", "store"]
    [[stages]]
    name = "extract"
    command = ["{PY}", "-c", "import sys, time; d = open(sys.argv[1]).read(); time.sleep(float(d)) if d != 'bad' else sys.exit(3)", "{{path}}"]
    concurrency = 2
    [[stages]]
    name = "store"
    command = ["true"]
    concurrency = 2
    """


class WebDriver:
    """Just enough of the W3C WebDriver protocol: a session, navigate, run a script."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = ""

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["value"]

    def start(self, chromium: str, profile: Path) -> None:
        options = {"binary": chromium, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": options}}}  # fmt: skip
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def go(self, url: str) -> None:
        self.call("POST", f"/session/{self.session}/url", {"url": url})

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.call("GET", f"/session/{self.session}/screenshot")))

    def js(self, script: str) -> Any:
        return self.call("POST", f"/session/{self.session}/execute/sync",
                         {"script": script, "args": []})  # fmt: skip

    def wait(self, script: str, timeout: float = 30.0) -> Any:
        """Run ``script`` until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.js(script)
            if result:
                return result
            assert time.monotonic() < deadline, f"never true: {script}"
            time.sleep(0.1)


@contextlib.contextmanager
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    chromium = need_tool("chromium", "headless page tests; Debian's chromium package")
    chromedriver = need_tool("chromedriver", "drives Chromium; Debian's chromium-driver package")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    driver_log = tmp_path / "chromedriver.log"
    with open(driver_log, "wb") as log:
        proc = subprocess.Popen([chromedriver, f"--port={port}"], stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    driver = WebDriver(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if driver.call("GET", "/status")["ready"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, driver_log.read_text()
            time.sleep(0.05)
        driver.start(chromium, tmp_path / "profile")
        yield driver
    finally:
        if driver.session:
            with contextlib.suppress(OSError):
                driver.call("DELETE", f"/session/{driver.session}")
        proc.terminate()
        proc.wait(10)


ROWS = """return Array.from(document.querySelectorAll('#{table} tbody tr:not(.empty)'))
                 .map(tr => Array.from(tr.cells).map(td => td.textContent));"""


def test_page_renders_the_tables_on_a_phone_and_refreshes_itself(tmp_path: Path) -> None:
    service = Service(tmp_path, service_config(PIPELINE))
    try:
        url = service.url
        with browser(tmp_path) as driver:
            # Given: a person opens the page on a phone-sized screen
            driver.go(url + "/?refresh=0.3")
            stages = driver.wait(ROWS.format(table="stages"))
            assert [row[0] for row in stages] == ["extract", "store"]
            # When: a 2.5 s run goes on and another item fails for good
            (tmp_path / "in" / "slow").write_text("2.5")
            (tmp_path / "in" / "broken").write_text("bad")
            # Then: without a reload, the page shows them: the stage table…
            running = driver.wait(ROWS.format(table="running"))
            failures = driver.wait(ROWS.format(table="failures"))
            stages = driver.js(ROWS.format(table="stages"))
            extract = dict(zip(["stage", "queued", "running", "retry", "done", "dead", "slots",
                                "waiting", "holders"], stages[0], strict=True))  # fmt: skip
            assert (extract["running"], extract["dead"]) == ("1", "1"), extract
            assert extract["slots"] == "1/2"
            assert extract["holders"] == "in:slow"
            # … the run going on and the failure…
            assert running[0][:3] == ["in:slow", "extract", "1"]
            assert [(f[1], f[2], f[4], f[5]) for f in failures] == [
                ("in:broken", "extract", "failed", "dead")
            ]
            # … a badge that says ok, and nothing wider than the phone (tables scroll).
            assert driver.js("return document.getElementById('health').textContent") == "ok"
            assert driver.js("return document.documentElement.scrollWidth <= window.innerWidth")
            driver.screenshot(tmp_path / "page.png")
            # When the run is over, the page follows it to the end of its route.
            driver.wait("""return Array.from(document.querySelectorAll('#stages tbody tr'))
                             .some(tr => tr.cells[0].textContent === 'store'
                                         && tr.cells[4].textContent === '1');""")  # fmt: skip
            assert driver.js(ROWS.format(table="running")) == []
            assert (
                driver.js("return document.querySelector('#running tbody').textContent") == "none"
            )
    finally:
        service.stop()
