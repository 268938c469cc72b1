"""``/metrics``: what the service knows at scrape time, as Prometheus families.

Request counters and latency histograms are registered by the app; this collector reads the
rest when Prometheus scrapes: prediction outcomes, the served version, the predictor's
statistics and each version's acceptance (from Redis; Redis down leaves the rest answering).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from backend.service.valve_model import NO_MODEL_VERSION, ValveModel

__all__ = ["StateCollector"]

logger = logging.getLogger(__name__)

_MONOTONIC_STATS = frozenset({"cache_hits", "cache_misses", "images_inferred", "image_errors"})
"""Predictor statistics that only grow (exported as counters, the rest as gauges)."""


class StateCollector:
    """Metrics read at scrape time from the model, the predictor and Redis."""

    def __init__(
        self,
        model: ValveModel,
        predictor: Any,
        acceptance: Callable[[], Mapping[str, Mapping[str, int]]],
    ) -> None:
        self.model = model
        self.predictor = predictor
        self.acceptance = acceptance

    def describe(self) -> list[Any]:
        return []  # dynamic: families depend on the predictor's stats and Redis contents

    def collect(self) -> Iterable[Any]:
        outcomes = CounterMetricFamily(
            "valve_id_predictions", "Tasks answered by /predict, by outcome", labels=["outcome"]
        )
        for outcome, n in sorted(self.model.outcome_counts().items()):
            outcomes.add_metric([outcome], n)
        yield outcomes

        version = self.predictor.version
        yield GaugeMetricFamily(
            "valve_id_model_loaded", "1 if a model version is served", value=int(bool(version))
        )
        yield InfoMetricFamily(
            "valve_id_model",
            "The served model version",
            value={"version": version or NO_MODEL_VERSION},
        )
        yield from self._predictor_stats()
        yield from self._acceptance()

    def _predictor_stats(self) -> Iterable[Any]:
        try:
            stats = dict(self.predictor.stats())
        except Exception as exc:
            logger.debug("predictor stats unavailable: %s", type(exc).__name__)
            return
        for key, value in sorted(stats.items()):
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name = "valve_id_predictor_" + "".join(
                c if c.isalnum() else "_" for c in str(key).lower()
            )
            family = CounterMetricFamily if key in _MONOTONIC_STATS else GaugeMetricFamily
            yield family(name, f"Predictor statistic {key!r}", value=value)

    def _acceptance(self) -> Iterable[Any]:
        reviewed = GaugeMetricFamily(
            "valve_id_acceptance_reviewed",
            "Annotations of tasks this version pre-annotated",
            labels=["version"],
        )
        accepted = GaugeMetricFamily(
            "valve_id_acceptance_accepted",
            "...of which the annotator kept the proposed class",
            labels=["version"],
        )
        rate = GaugeMetricFamily(
            "valve_id_acceptance_rate", "accepted / reviewed per version", labels=["version"]
        )
        try:
            for version, row in sorted(self.acceptance().items()):
                total, kept = int(row.get("total", 0)), int(row.get("accepted", 0))
                reviewed.add_metric([version], total)
                accepted.add_metric([version], kept)
                if total:
                    rate.add_metric([version], kept / total)
        except Exception as exc:  # Redis down: the rest of /metrics still answers
            logger.debug("acceptance metrics unavailable: %s", type(exc).__name__)
        yield reviewed
        yield accepted
        yield rate
