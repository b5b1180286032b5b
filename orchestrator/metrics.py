"""Prometheus metrics, every series prefixed ``orchestrator_`` (DESIGN §8).

Two kinds, in one private `prometheus_client.CollectorRegistry` per service (never the global
one, so that several services -- tests -- can live in one process):

- counters and histograms fed by the engine's ``on_run_end`` observers as runs end;
- gauges read from the engine, the limits, the watchdog and the store *at scrape time* by a
  collector, which runs in the trio thread (where reading trio's statistics is safe). The item
  counts come from the store, read in its thread by `Metrics.refresh` just before each scrape.

=========================================================  =========  =============================
series                                                     type       labels
=========================================================  =========  =============================
``orchestrator_items``                                     gauge      stage, state
``orchestrator_stage_runs_total``                          counter    stage, outcome
``orchestrator_run_duration_seconds``                      histogram  stage
``orchestrator_slot_wait_seconds``                         histogram  stage
``orchestrator_running_runs``                              gauge      stage
``orchestrator_slots_busy``                                gauge      kind (stage|pool), name
``orchestrator_slots_capacity``                            gauge      kind (stage|pool), name
``orchestrator_slot_waiters``                              gauge      kind (stage|pool), name
``orchestrator_retries_total``                             counter    stage
``orchestrator_kills_total``                               counter    stage, signal (sent by us)
``orchestrator_runs_killed_by_signal_total``               counter    stage, signal (that ended it)
``orchestrator_loop_lag_seconds``                          histogram  (heartbeat lateness)
``orchestrator_loop_stalls_total``                         counter    (loop blocked > warn)
``orchestrator_pipeline_stalls_total``                     counter    kind
``orchestrator_pipeline_stalled``                          gauge      kind (going on now)
``orchestrator_source_last_poll_timestamp_seconds``        gauge      source
``orchestrator_reloads_total``                             counter    result (ok|failed: SIGHUP)
``orchestrator_healthy`` / ``orchestrator_draining``       gauge
``orchestrator_store_commits_total`` / ``_syncs_total``    counter
``orchestrator_store_write_failed``                        gauge
``orchestrator_status_file_write_failed``                  gauge
``orchestrator_source_problem``                            gauge      source (1: takes nothing now)
``orchestrator_build_info`` / ``_start_time_seconds``      gauge      version
=========================================================  =========  =============================

Plus the standard ``process_*`` series (resident memory, CPU, open files).
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from orchestrator import __version__
from orchestrator.runner import Outcome
from orchestrator.status import op_stage_counts
from orchestrator.store.records import ItemState
from orchestrator.watchdog import LAG_BUCKETS

if TYPE_CHECKING:
    from collections.abc import Iterable

    from prometheus_client.metrics_core import Metric

    from orchestrator.runner import RunResult
    from orchestrator.store.records import Transition
    from orchestrator.watchdog import Watchdog
    from orchestrator.workers import Engine

__all__ = ["CONTENT_TYPE", "Metrics"]

#: The classic text format (0.0.4): what every Prometheus server and promtool read.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Run durations: from a quick tool (tens of ms) to a long extraction (an hour).
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Slot waits: none at all (most runs) up to an hour behind an exclusive tool.
SLOT_WAIT_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600)
#: Item states shown (with 0) for every stage, so dashboards see each series from the start.
ITEM_STATES = tuple(s.value for s in ItemState)
#: Signals the runner sends, shown (with 0) for every stage.
KILL_SIGNALS = ("SIGTERM", "SIGKILL")


class Metrics:
    """The service's metrics; `observe_run` is registered on ``engine.on_run_end``.

    Synopsis::

        metrics = Metrics(engine, watchdog)
        await metrics.refresh()          # item counts from the store (its thread)
        body = metrics.render()          # the text format, for GET /metrics
    """

    def __init__(self, engine: Engine, watchdog: Watchdog) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.engine = engine
        self.watchdog = watchdog
        self.registry = CollectorRegistry()
        self._counts: dict[str, dict[str, int]] = {}
        self._started = time.time()
        r = self.registry
        self.runs = Counter("orchestrator_stage_runs", "Runs ended, per stage and outcome.",
                            ["stage", "outcome"], registry=r)  # fmt: skip
        self.duration = Histogram(
            "orchestrator_run_duration_seconds", "How long runs took, per stage.", ["stage"],
            buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.slot_wait = Histogram(
            "orchestrator_slot_wait_seconds",
            "How long runs waited for their stage's and pools' slots, per stage.", ["stage"],
            buckets=SLOT_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.retries = Counter("orchestrator_retries",
                               "Runs that failed and left their item waiting for a retry.",
                               ["stage"], registry=r)  # fmt: skip
        self.kills = Counter(
            "orchestrator_kills",
            "Signals sent to runs' process groups (timeout, stall, shutdown), per stage and signal.",
            ["stage", "signal"], registry=r,
        )  # fmt: skip
        self.killed_by = Counter(
            "orchestrator_runs_killed_by_signal",
            "Runs whose process was ended by a signal, per stage and signal.",
            ["stage", "signal"], registry=r,
        )  # fmt: skip
        for stage in engine.config.stages:
            for outcome in Outcome:
                self.runs.labels(stage.name, outcome.value)
            self.duration.labels(stage.name)
            self.slot_wait.labels(stage.name)
            self.retries.labels(stage.name)
            for sig in KILL_SIGNALS:
                self.kills.labels(stage.name, sig)
        r.register(_EngineCollector(self))
        ProcessCollector(registry=r)
        engine.on_run_end.append(self.observe_run)

    def observe_run(
        self, stage: str, result: RunResult, slot_wait: float, transition: Transition
    ) -> None:
        """Count one ended run (an ``engine.on_run_end`` observer: quick, never raises)."""
        self.runs.labels(stage, result.outcome.value).inc()
        self.duration.labels(stage).observe(result.duration)
        self.slot_wait.labels(stage).observe(slot_wait)
        if transition.state is ItemState.RETRY_WAIT:
            self.retries.labels(stage).inc()
        for sig in result.signals_sent:
            self.kills.labels(stage, sig).inc()
        if result.signal is not None:
            self.killed_by.labels(stage, _signal_name(result.signal)).inc()

    async def refresh(self) -> None:
        """Read the item counts from the store (in its thread); kept on failure."""
        self._counts = await self.engine.store.read(op_stage_counts)

    def render(self) -> bytes:
        """The registry in Prometheus's text format (CPU only; call it in the trio thread)."""
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges read from the engine, limits, watchdog and store at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[Metric]:
        engine, watchdog = self.m.engine, self.m.watchdog
        items = GaugeMetricFamily("orchestrator_items",
                                  "Items per stage and state, from the store (done and dead"
                                  " count at the stage where they ended).",
                                  labels=["stage", "state"])  # fmt: skip
        stages = [s.name for s in engine.config.stages]
        counts = self.m._counts
        for stage in stages + sorted(set(counts) - set(stages)):
            per = counts.get(stage, {})
            for state in ITEM_STATES:
                items.add_metric([stage, state], per.get(state, 0))
        yield items

        running = GaugeMetricFamily("orchestrator_running_runs", "Runs going on now, per stage.",
                                    labels=["stage"])  # fmt: skip
        per_stage = dict.fromkeys(stages, 0)
        for run in engine.running.values():
            per_stage[run.stage] = per_stage.get(run.stage, 0) + 1
        for stage, n in per_stage.items():
            running.add_metric([stage], n)
        yield running

        busy = GaugeMetricFamily("orchestrator_slots_busy", "Slots held, per stage and pool.",
                                 labels=["kind", "name"])  # fmt: skip
        total = GaugeMetricFamily("orchestrator_slots_capacity", "Slots there are, per stage and pool.",
                                  labels=["kind", "name"])  # fmt: skip
        waiters = GaugeMetricFamily("orchestrator_slot_waiters",
                                    "Runs waiting for a slot, per stage and pool.",
                                    labels=["kind", "name"])  # fmt: skip
        for s in engine.slots.statistics():
            busy.add_metric([s.kind, s.name], s.busy)
            total.add_metric([s.kind, s.name], s.total)
            waiters.add_metric([s.kind, s.name], s.waiting)
        yield from (busy, total, waiters)

        lag = HistogramMetricFamily("orchestrator_loop_lag_seconds",
                                    "How late the event loop's heartbeat ticks were.")  # fmt: skip
        cumulative, buckets = 0, []
        for bound, n in zip((*LAG_BUCKETS, float("inf")), watchdog.lag.counts, strict=True):
            cumulative += n
            buckets.append((_bound(bound), cumulative))
        lag.add_metric([], buckets, watchdog.lag.total)
        yield lag
        yield CounterMetricFamily("orchestrator_loop_stalls",
                                  "Times the event loop was found blocked past loop_stall_warn.",
                                  value=watchdog.loop_stalls)  # fmt: skip

        stalls = CounterMetricFamily("orchestrator_pipeline_stalls",
                                     "Pipeline stalls noticed, per kind (no_progress,"
                                     " overdue_run, slot_wait).", labels=["kind"])  # fmt: skip
        stalled = GaugeMetricFamily("orchestrator_pipeline_stalled",
                                    "Pipeline stalls going on now, per kind.",
                                    labels=["kind"])  # fmt: skip
        now_by_kind = dict.fromkeys(watchdog.stall_counts, 0)
        for stall in watchdog.stalls.values():
            now_by_kind[stall.kind] = now_by_kind.get(stall.kind, 0) + 1
        for kind, n in watchdog.stall_counts.items():
            stalls.add_metric([kind], n)
            stalled.add_metric([kind], now_by_kind.get(kind, 0))
        yield from (stalls, stalled)

        reloads = CounterMetricFamily("orchestrator_reloads",
                                      "SIGHUP reloads, by result (failed: the config was "
                                      "invalid; nothing changed).", labels=["result"])  # fmt: skip
        for result in ("ok", "failed"):
            reloads.add_metric([result], engine.reloads[result])
        yield reloads

        polls = GaugeMetricFamily("orchestrator_source_last_poll_timestamp_seconds",
                                  "When each source's last poll finished (unix time).",
                                  labels=["source"])  # fmt: skip
        now_trio, now_wall = trio.current_time(), time.time()
        for source, at in sorted(dict(engine.last_poll).items()):
            polls.add_metric([source], now_wall - (now_trio - at))
        yield polls

        reasons = watchdog.health_reasons()
        yield GaugeMetricFamily("orchestrator_healthy", "1 when /health answers 200.",
                                value=0 if reasons else 1)  # fmt: skip
        yield GaugeMetricFamily("orchestrator_draining", "1 while the service drains.",
                                value=1 if engine.stopping else 0)  # fmt: skip
        store = engine.store
        yield CounterMetricFamily("orchestrator_store_commits", "Store transactions committed.",
                                  value=store.commits)  # fmt: skip
        yield CounterMetricFamily("orchestrator_store_syncs", "Store WAL fsyncs.",
                                  value=store.syncs)  # fmt: skip
        yield GaugeMetricFamily("orchestrator_store_write_failed",
                                "1 when the store's last transaction or fsync failed.",
                                value=1 if store.last_failure else 0)  # fmt: skip
        yield GaugeMetricFamily("orchestrator_status_file_write_failed",
                                "1 when the last write of the status file failed.",
                                value=1 if engine.status_file_failure else 0)  # fmt: skip
        problems = GaugeMetricFamily("orchestrator_source_problem",
                                     "1 when a source takes nothing now: its folder cannot be "
                                     "listed, or its poller failed.", labels=["source"])  # fmt: skip
        for src in engine.config.sources:
            problems.add_metric([src.name], 1 if src.name in engine.source_problems else 0)
        yield problems
        info = GaugeMetricFamily("orchestrator_build_info", "The running version (always 1).",
                                 labels=["version"])  # fmt: skip
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily("orchestrator_start_time_seconds",
                                "When the service started (unix time).",
                                value=self.m._started)  # fmt: skip


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
