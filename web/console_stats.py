"""The console's live chart: requests per second and the median time to first token over the
last ten minutes, sampled from the gateway's own Prometheus metrics (web/metrics.py).

The sampler reads the text exposition every `interval` seconds, as a scrape would, so that
with several web workers it sees their summed counts (`Metrics.exposition`), and keeps, for
each interval, the change since the last reading: no second set of counters on the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .gateway import CHAT_PATHS, VLLM_ROUTES
from .metrics import TTFT

log = logging.getLogger("tide_vllm.web")

REQUESTS = "tide_vllm_requests"
INTERVAL = 5  # seconds between samples
WINDOW = 600  # seconds of samples kept
# The requests the chart counts: those for the model (chat and vLLM's own API, relayed). The
# probes, scrapes and the console's own calls would otherwise be most of an idle service's.
MODEL_ROUTES = frozenset({*CHAT_PATHS, *VLLM_ROUTES})


@dataclass(frozen=True, slots=True)
class Reading:
    """Cumulative counts of one exposition: the model's requests, and the time to first token's
    histogram summed over its labels, as (upper bound, cumulative count), +Inf last."""

    requests: float
    ttft_buckets: tuple[tuple[float, float], ...]


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # unix seconds, the end of the interval
    requests_per_s: float
    ttft_p50_ms: float | None  # None: no stream saw its first token in the interval

    def as_json(self) -> dict[str, Any]:
        return {
            "t": round(self.t, 3),
            "requests_per_s": round(self.requests_per_s, 3),
            "ttft_p50_ms": None if self.ttft_p50_ms is None else round(self.ttft_p50_ms, 2),
        }


def read_exposition(text: str) -> Reading:
    """The counts the chart needs, from Prometheus's text format."""
    requests = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == REQUESTS:
            for sample in family.samples:
                if sample.name == REQUESTS + "_total" and sample.labels.get("route") in (
                    MODEL_ROUTES
                ):
                    requests += sample.value
        elif family.name == TTFT:
            for sample in family.samples:
                if sample.name == TTFT + "_bucket":
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return Reading(requests, tuple(sorted(buckets.items())))


def _growth(before: float, after: float) -> float:
    """A counter's growth; a counter that went down was reset (a worker restarted)."""
    return after - before if after >= before else after


def median_of_buckets(buckets: Iterable[tuple[float, float]]) -> float | None:
    """The median of a histogram given as (upper bound, cumulative count), bounds ascending,
    interpolated linearly within its bucket as Prometheus's histogram_quantile does (from 0 for
    the first bucket; the highest finite bound when it falls in +Inf's). None when empty."""
    points = list(buckets)
    if not points or points[-1][1] <= 0:
        return None
    rank = points[-1][1] / 2
    lower, below = 0.0, 0.0
    for bound, count in points:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def interval_sample(before: Reading, after: Reading, seconds: float, t: float) -> Sample:
    """What happened between two readings `seconds` apart."""
    requests = _growth(before.requests, after.requests)
    earlier = dict(before.ttft_buckets)
    delta = [
        (bound, _growth(earlier.get(bound, 0.0), count)) for bound, count in after.ttft_buckets
    ]
    median = median_of_buckets(delta)
    return Sample(
        t=t,
        requests_per_s=requests / seconds if seconds > 0 else 0.0,
        ttft_p50_ms=None if median is None else median * 1000,
    )


class StatsSampler:
    """Keeps the last `window` seconds of samples, one every `interval` seconds. `run` is the
    background task (build_app's lifespan starts and cancels it); `tick` takes one sample."""

    def __init__(
        self,
        exposition: Callable[[], bytes],
        interval: float = INTERVAL,
        window: float = WINDOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.interval = interval
        self._exposition = exposition
        self._clock = clock
        self._samples: deque[Sample] = deque(maxlen=max(1, round(window / interval)))
        self._last: tuple[float, Reading] | None = None

    def tick(self) -> Sample | None:
        """Read the metrics now; the sample of the interval since the last reading (None at
        the first reading, which only sets the baseline)."""
        now = self._clock()
        reading = read_exposition(self._exposition().decode())
        last, self._last = self._last, (now, reading)
        if last is None:
            return None
        sample = interval_sample(last[1], reading, now - last[0], now)
        self._samples.append(sample)
        return sample

    def samples(self) -> list[Sample]:
        return list(self._samples)

    def as_json(self) -> dict[str, Any]:
        return {"interval": self.interval, "samples": [s.as_json() for s in self._samples]}

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except ValueError:  # an exposition the parser refuses: a gap in the chart
                log.warning("console stats: the metrics could not be read", exc_info=True)
            await asyncio.sleep(self.interval)
