"""The read-only HTTP face: ``/health``, ``/metrics``, ``/status`` and a page for people at ``/``.

Served by hypercorn's trio worker inside the service's nursery, on ``[http] listen`` (loopback by
default), by a raw ASGI app -- four routes need no framework, and every MiB counts on an edge
device. Handlers only read: the engine's state in the trio thread, the store in its own thread.

=============  ===================================================================================
``/health``    200 ``{"status": "ok"}``, or 503 with ``status`` ``degraded`` or ``draining`` and
               the ``reasons``: the store's last write failed, the status file cannot be
               written, a source's folder cannot be listed (or its poller failed), the event
               loop was blocked, the pipeline stalled, the service is draining
``/metrics``   Prometheus's text format (`orchestrator.metrics`)
``/status``    the status document (as in ``status.json``), built now, plus ``health``
``/``          a small page that refreshes itself from ``/status`` (every 2 s, or
               ``?refresh=SECONDS``): stages with their queues and slots, pools, running runs,
               recent failures
=============  ===================================================================================
"""

from __future__ import annotations

import json
import logging
import socket
from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from loguru import logger

from orchestrator.errors import OrchestratorError
from orchestrator.metrics import CONTENT_TYPE, Metrics
from orchestrator.status import op_stage_counts, snapshot

if TYPE_CHECKING:
    from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

    from orchestrator.watchdog import Watchdog
    from orchestrator.workers import Engine

__all__ = ["HttpUnavailable", "WebApp", "serve_http"]

#: How long open requests may take to finish when the server stops.
HTTP_GRACE = 1.0
#: Pending connections the listening socket queues (a scraper, a phone, a health probe).
HTTP_BACKLOG = 64
#: How often the page asks for /status (milliseconds).
PAGE_REFRESH_MS = 2000
#: The stdlib logger hypercorn reports its errors to (routed to loguru by `orchestrator.logs`).
HTTP_LOGGER = "orchestrator.http"

_Headers = list[tuple[bytes, bytes]]


class HttpUnavailable(OrchestratorError):
    """Raised when the HTTP server cannot listen on ``[http] listen`` (the port is taken)."""

    def __init__(self, listen: str, reason: str) -> None:
        self.listen = listen
        self.reason = reason
        super().__init__(
            f"cannot listen on {listen!r} for HTTP: {reason}; free the port, choose another"
            " [http] listen, or set listen = false"
        )


class WebApp:
    """The ASGI app: routes GET/HEAD requests to the four read-only views."""

    def __init__(self, engine: Engine, watchdog: Watchdog, metrics: Metrics) -> None:
        self.engine = engine
        self.watchdog = watchdog
        self.metrics = metrics
        self._page = PAGE.replace("{refresh_ms}", str(PAGE_REFRESH_MS)).encode()

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003, "reason": ""})
            return
        method, path = scope["method"], scope["path"]
        if method not in ("GET", "HEAD"):
            status, headers, body = _json(405, {"error": f"{method} not allowed; read-only"})
            headers.append((b"allow", b"GET, HEAD"))
        elif path == "/health":
            status, headers, body = self.health()
        elif path == "/metrics":
            status, headers, body = await self.metrics_view()
        elif path == "/status":
            status, headers, body = await self.status_view()
        elif path in ("/", "/index.html"):
            status, headers, body = (
                200,
                [(b"content-type", b"text/html; charset=utf-8")],
                self._page,
            )
        else:
            status, headers, body = _json(404, {"error": f"no such page {path!r}",
                                                "pages": ["/", "/health", "/metrics", "/status"]})  # fmt: skip
        headers += [(b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": status, "headers": headers,
                    "trailers": False})  # fmt: skip
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body,
                    "more_body": False})  # fmt: skip

    def health(self) -> tuple[int, _Headers, bytes]:
        doc = self.watchdog.health()
        return _json(200 if doc["status"] == "ok" else 503, doc)

    async def metrics_view(self) -> tuple[int, _Headers, bytes]:
        try:
            await self.metrics.refresh()
        except Exception as exc:  # the store is busy or failing: serve the last counts
            logger.debug("metrics: cannot read the item counts: {}", exc)
        return 200, [(b"content-type", CONTENT_TYPE.encode())], self.metrics.render()

    async def status_view(self) -> tuple[int, _Headers, bytes]:
        try:
            counts = await self.engine.store.read(op_stage_counts)
        except Exception as exc:
            return _json(503, {"error": f"cannot read the store: {exc}",
                               "health": self.watchdog.health()})  # fmt: skip
        state = "draining" if self.engine.stopping else "running"
        return _json(200, snapshot(self.engine, counts, state=state,
                                   health=self.watchdog.health()))  # fmt: skip


def _json(status: int, doc: object) -> tuple[int, _Headers, bytes]:
    body = json.dumps(doc, indent=1).encode()
    return status, [(b"content-type", b"application/json")], body


async def serve_http(
    engine: Engine, watchdog: Watchdog, *, listen: str,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:  # fmt: skip
    """Serve the app on ``listen`` until cancelled; ``task_status`` gets the bound URLs.

    Raises:
        HttpUnavailable: the address cannot be bound (before ``task_status.started``).
    """
    try:
        sock = await trio.to_thread.run_sync(_bind, listen)  # getaddrinfo may block
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise HttpUnavailable(listen, reason[:1].lower() + reason[1:]) from None
    try:
        metrics = Metrics(engine, watchdog)
        app = WebApp(engine, watchdog, metrics)
        errors = logging.getLogger(HTTP_LOGGER)
        errors.setLevel(logging.WARNING)  # not hypercorn's "Running on … (CTRL + C to quit)"
        config = HypercornConfig()
        config.accesslog = None
        config.errorlog = errors
        config.graceful_timeout = HTTP_GRACE
        # Our own socket rather than config.bind: hypercorn would leave it inheritable by the
        # stage processes, and leak it when the bind fails.
        await worker_serve(
            wrap_app(app, config.wsgi_max_body_size, "asgi"), config,
            sockets=Sockets([], [sock], []), task_status=task_status,
        )  # fmt: skip
    finally:
        sock.close()


def _bind(listen: str) -> socket.socket:
    """A listening socket on ``listen`` (``host:port`` or ``[v6]:port``; blocking)."""
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)  # fmt: skip
    error: OSError = OSError(f"no address for {host!r}")
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(address)
            sock.listen(HTTP_BACKLOG)
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>orchestrator</title>
<style>
 :root { color-scheme: light dark; --dim: #888; --bad: #c33; --ok: #2a2; --warn: #c80; }
 body { font: 14px/1.4 system-ui, sans-serif; margin: 0.8em; max-width: 60em; }
 h1 { font-size: 1.2em; margin: 0 0 0.2em; }
 h2 { font-size: 1em; margin: 1.2em 0 0.3em; }
 #meta, .dim { color: var(--dim); }
 .scroll { overflow-x: auto; }
 table { border-collapse: collapse; width: 100%; }
 th, td { text-align: left; padding: 0.25em 0.4em; border-bottom: 1px solid #8884;
          white-space: nowrap; }
 tr.empty td { color: var(--dim); }
 @media (max-width: 30em) { body { font-size: 13px; margin: 0.5em; } }
 td.num, th.num { text-align: right; }
 td.wrap { white-space: normal; word-break: break-word; }
 .badge { display: inline-block; padding: 0 0.5em; border-radius: 0.6em; color: #fff; }
 .ok { background: var(--ok); } .degraded, .error { background: var(--bad); }
 .draining, .stopped { background: var(--warn); }
 #reasons { color: var(--bad); margin: 0.3em 0; padding-left: 1.2em; }
</style>
</head>
<body>
<h1>orchestrator <span id="health" class="badge">…</span></h1>
<div id="meta">loading…</div>
<ul id="reasons"></ul>
<h2>Stages</h2>
<div class="scroll"><table id="stages">
 <thead><tr><th>stage</th><th class="num">queued</th><th class="num">running</th>
  <th class="num">retry</th><th class="num">done</th><th class="num">dead</th>
  <th class="num">slots</th><th class="num">waiting</th><th>holders</th></tr></thead>
 <tbody></tbody></table></div>
<h2>Pools</h2>
<div class="scroll"><table id="pools">
 <thead><tr><th>pool</th><th class="num">slots</th><th class="num">waiting</th>
  <th>holders</th></tr></thead>
 <tbody></tbody></table></div>
<h2>Running</h2>
<div class="scroll"><table id="running">
 <thead><tr><th>item</th><th>stage</th><th class="num">attempt</th><th class="num">age</th>
  <th class="num">pid</th></tr></thead>
 <tbody></tbody></table></div>
<h2>Recent failures</h2>
<div class="scroll"><table id="failures">
 <thead><tr><th>when</th><th>item</th><th>stage</th><th class="num">attempt</th>
  <th>outcome</th><th>next</th><th>reason</th></tr></thead>
 <tbody></tbody></table></div>
<script>
"use strict";
const asked = Number(new URLSearchParams(location.search).get("refresh"));
const REFRESH_MS = asked > 0 ? Math.max(200, asked * 1000) : {refresh_ms};
function fill(id, rows, classes) {
  const body = document.querySelector("#" + id + " tbody");
  if (!rows.length) {
    const tr = document.createElement("tr"), td = document.createElement("td");
    tr.className = "empty";
    td.colSpan = document.querySelectorAll("#" + id + " thead th").length;
    td.textContent = "none";
    tr.append(td);
    body.replaceChildren(tr);
    return;
  }
  body.replaceChildren(...rows.map(row => {
    const tr = document.createElement("tr");
    row.forEach((value, i) => {
      const td = document.createElement("td");
      td.textContent = value;
      if (classes && classes[i]) td.className = classes[i];
      tr.append(td);
    });
    return tr;
  }));
}
function secs(s) {
  return s < 120 ? s.toFixed(1) + "s" : s < 7200 ? (s / 60).toFixed(1) + "m" : (s / 3600).toFixed(1) + "h";
}
function render(s) {
  const h = s.health || {status: "ok", reasons: []};
  const badge = document.getElementById("health");
  badge.textContent = s.state === "running" ? h.status : s.state;
  badge.className = "badge " + (s.state === "running" ? h.status : s.state);
  document.getElementById("meta").textContent =
    s.host + " · pid " + s.pid + " · v" + s.version + " · started " + s.started +
    " · updated " + new Date(s.updated_unix * 1000).toLocaleTimeString();
  document.getElementById("reasons").replaceChildren(...h.reasons.map(r => {
    const li = document.createElement("li"); li.textContent = r; return li;
  }));
  const n = ["", "num", "num", "num", "num", "num", "num", "num", "wrap"];
  fill("stages", Object.entries(s.stages).map(([name, st]) => [
    name, st.queued, st.running, st.retry_wait, st.done, st.dead,
    st.in_config === false ? "not in config" : st.busy + "/" + st.concurrency, st.waiting,
    st.holders.join(", ")]), n);
  fill("pools", Object.entries(s.pools).map(([name, p]) => [
    name, p.busy + "/" + p.size, p.waiting, p.holders.join(", ")]), ["", "num", "num", "wrap"]);
  fill("running", s.running.map(r => [r.item, r.stage, r.attempt, secs(r.age), r.pid ?? ""]),
       ["wrap", "", "num", "num", "num"]);
  fill("failures", s.recent_errors.slice().reverse().map(e => [
    new Date(e.at * 1000).toLocaleTimeString(), e.item, e.stage, e.attempt, e.outcome, e.next,
    e.reason]), ["", "wrap", "", "num", "", "", "wrap"]);
  document.body.dataset.updated = String(s.updated_unix);
}
async function refresh() {
  try {
    const response = await fetch("status", {cache: "no-store"});
    render(await response.json());
  } catch (err) {
    const badge = document.getElementById("health");
    badge.textContent = "unreachable";
    badge.className = "badge error";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}
refresh();
</script>
</body>
</html>
"""
