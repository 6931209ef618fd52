"""Tallied metrics export exactly what direct prometheus_client calls would have."""
from __future__ import annotations

import asyncio
import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.telemetry import metrics
from gateway.telemetry.metrics import DURATION_BUCKETS, HistogramTally, LevelTally, Tally


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample but the ``_created`` timestamps, keyed by name and labels."""
    return {s.name + str(sorted(s.labels.items())): s.value for m in registry.collect() for s in m.samples
            if not s.name.endswith("_created")}


def _pair(registry_a: CollectorRegistry, registry_b: CollectorRegistry) -> tuple[Counter, Counter]:
    return (Counter("t_requests", "doc", ["server", "status"], registry=registry_a),
            Counter("t_requests", "doc", ["server", "status"], registry=registry_b))


def test_counter_tally_matches_direct_increments() -> None:
    direct_reg, tally_reg = CollectorRegistry(), CollectorRegistry()
    direct, tallied = _pair(direct_reg, tally_reg)
    tally = Tally(tallied)
    try:
        for server, status in [("a", 200), ("a", 200), ("b", 404), ("a", 500)]:
            direct.labels(server, str(status)).inc()
            tally.inc((server, status))          # ints become label strings on flush
        tally.flush()
        tally.flush()                            # idempotent: nothing pending twice
        assert _samples(direct_reg) == _samples(tally_reg)
        assert tally.pending == {}
    finally:
        metrics._TALLIES.remove(tally)


@pytest.mark.parametrize("raw_max", [HistogramTally.RAW_MAX, 7])
def test_histogram_tally_matches_observe_bucket_for_bucket(raw_max: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw values bucketed in bulk (at flush, or each time a list holds ``RAW_MAX``) land in
    the same buckets as ``Histogram.observe`` puts them one by one, bounds included."""
    monkeypatch.setattr(HistogramTally, "RAW_MAX", raw_max)
    direct_reg, tally_reg = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("t_seconds", "doc", ["server"], buckets=DURATION_BUCKETS, registry=direct_reg)
    tallied = Histogram("t_seconds", "doc", ["server"], buckets=DURATION_BUCKETS, registry=tally_reg)
    tally = HistogramTally(tallied, DURATION_BUCKETS)
    rng = random.Random(7)
    values = [0.0, 0.0005, 0.001, 300.0, 301.0, *DURATION_BUCKETS] + [rng.expovariate(50) for _ in range(500)]
    try:
        for i, v in enumerate(values):
            server = "a" if i % 3 else "b"
            direct.labels(server).observe(v)
            tally.observe((server,), v)
            if i == 250:
                tally.flush()                    # flushing midway changes nothing
        tally.flush()
        got, want = _samples(tally_reg), _samples(direct_reg)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert abs(got[key] - value) < 1e-9, key
    finally:
        metrics._TALLIES.remove(tally)


def test_level_tally_sets_the_gauge() -> None:
    reg = CollectorRegistry()
    gauge = Gauge("t_inflight", "doc", ["server"], registry=reg)
    level = LevelTally(gauge)
    try:
        level.levels[("a",)] = 3
        level.flush()
        assert reg.get_sample_value("t_inflight", {"server": "a"}) == 3
        level.levels[("a",)] -= 3
        level.flush()
        assert reg.get_sample_value("t_inflight", {"server": "a"}) == 0
    finally:
        metrics._TALLIES.remove(level)


async def test_flush_every_flushes_periodically_and_on_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = CollectorRegistry()
    counter = Counter("t_periodic", "doc", ["server"], registry=reg)
    tally = Tally(counter)
    flushes = asyncio.Queue[None]()
    real_flush = metrics.flush

    def observed_flush() -> None:      # the real flush, announced
        real_flush()
        flushes.put_nowait(None)

    monkeypatch.setattr(metrics, "flush", observed_flush)
    try:
        tally.inc(("a",))
        task = asyncio.ensure_future(metrics.flush_every(0.01))
        await asyncio.wait_for(flushes.get(), 5.0)
        assert reg.get_sample_value("t_periodic_total", {"server": "a"}) == 1
        await asyncio.wait_for(flushes.get(), 5.0)       # and again, without new requests
        assert reg.get_sample_value("t_periodic_total", {"server": "a"}) == 1
        tally.inc(("a",))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert reg.get_sample_value("t_periodic_total", {"server": "a"}) == 2
    finally:
        metrics._TALLIES.remove(tally)


def test_a_new_metric_never_gets_the_bound_children_of_a_dead_one() -> None:
    # Bound children were once cached by id(metric): a metric created after another was
    # freed could get its id, and then its children (increments went to the dead metric).
    reg = CollectorRegistry()
    for i in range(200):
        gauge = Gauge(f"t_bound_{i}", "doc", ["server"], registry=reg)
        metrics.BOUND.get(gauge, "a").set(i + 1)
        assert reg.get_sample_value(f"t_bound_{i}", {"server": "a"}) == i + 1
        reg.unregister(gauge)
        del gauge


def test_no_created_series_are_exported() -> None:
    from prometheus_client import generate_latest

    import gateway.telemetry.metrics as m

    m.BOUND.get(m.REQUESTS, "s", "tools/call", "200").inc()
    text = generate_latest().decode()
    assert "mcpgw_requests_total" in text
    assert "_created" not in text
