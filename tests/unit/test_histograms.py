"""observe_many leaves a histogram as observing each value would (the sum up to rounding)."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from shared.histograms import observe_many

BUCKETS = (0.001, 0.002, 0.004, 0.01, 0.1, 1.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_exposition_as_observing_each_value(seed: int) -> None:
    rng = random.Random(seed)
    # Bucket edges, values past the last bound, zero and tiny values included.
    values = [rng.choice([0.0, 0.001, 0.002, 0.01, 5.0, rng.random() * 0.02]) for _ in range(500)]
    one, many = CollectorRegistry(), CollectorRegistry()
    each = Histogram("itl_seconds", "h", ["model"], buckets=BUCKETS, registry=one)
    batch = Histogram("itl_seconds", "h", ["model"], buckets=BUCKETS, registry=many)
    for v in values:
        each.labels("m").observe(v)
    observe_many(batch.labels("m"), values[:200])
    observe_many(batch.labels("m"), values[200:])
    observe_many(batch.labels("m"), [])
    for bound in [*map(str, BUCKETS), "+Inf"]:
        labels = {"model": "m", "le": bound}
        got = many.get_sample_value("itl_seconds_bucket", labels)
        assert got == one.get_sample_value("itl_seconds_bucket", labels), bound
    assert many.get_sample_value("itl_seconds_count", {"model": "m"}) == len(values)
    assert many.get_sample_value("itl_seconds_sum", {"model": "m"}) == pytest.approx(
        one.get_sample_value("itl_seconds_sum", {"model": "m"}), rel=1e-12
    )


def test_falls_back_to_observe_without_the_internals() -> None:
    seen: list[float] = []

    class Plain:
        def observe(self, value: float) -> None:
            seen.append(value)

    observe_many(Plain(), [0.5, 0.25])
    assert seen == [0.5, 0.25]
