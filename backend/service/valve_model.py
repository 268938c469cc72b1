"""The Label Studio ML-backend model class: ``setup``, ``predict(tasks, context)``, ``fit``.

The shape people know from Label Studio ML backends, without the frozen ``label-studio-ml``
package: :mod:`backend.service.app` turns HTTP into these three calls. The parts are injected, so
tests (and the end-to-end suite) swap them freely:

* ``predictor`` — the served model version (:class:`backend.service.predictor.Predictor`): bytes or
  exceptions in, one prediction or error per item out, in order;
* ``fetcher`` — task image URL → bytes (:class:`training.labelstudio.ImageFetcher`);
* ``retrainer`` — where webhook events and proposed labels go (:mod:`backend.loop.retraining`);
  it only writes to Redis / enqueues, so nothing here waits for training.

Fetching, predicting and mapping onto the project's classes is
:func:`backend.service.prelabel.prelabel`,
the path the pre-labelling and re-scoring jobs share; this class adds the label config per
project, chunking, outcome counts and the prediction records.

Nothing here calls Label Studio back while Label Studio waits for our answer: review views,
``model_version`` and re-scoring are jobs (:mod:`backend.loop.jobs`).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from backend.service.labelstudio import (
    PredictResponse,
    SetupRequest,
    Task,
    TaskResult,
)
from backend.service.prelabel import FetcherLike, prelabel
from backend.settings import Settings
from training.shared.labels import LabelConfig, load_label_config, parse_label_config

__all__ = [
    "FETCH_CHUNK_TASKS",
    "FETCH_THREADS",
    "NO_MODEL_VERSION",
    "FetcherLike",
    "PredictContext",
    "PredictorLike",
    "RetrainerHooks",
    "ValveModel",
]

logger = logging.getLogger(__name__)

NO_MODEL_VERSION = "none"
"""``model_version`` answered while no version has been trained and promoted yet."""
FETCH_THREADS = 8
"""Image downloads in flight at once (I/O bound: threads, not processes)."""
FETCH_CHUNK_TASKS = 64
"""Tasks fetched and predicted together; bounds the image bytes held in memory at once."""
_MAX_REMEMBERED_PROJECTS = 1000
"""Label configs kept from ``/setup`` (one per project; least recently used dropped first),
and the bound on notices remembered as already logged."""


class PredictorLike(Protocol):
    """What :class:`ValveModel` needs from :class:`backend.service.predictor.Predictor`."""

    version: str | None
    load_error: str | None

    def refresh(self) -> Any: ...

    def predict(self, images: Sequence[bytes | BaseException]) -> list[Any]: ...

    def info(self) -> Mapping[str, Any]: ...

    def stats(self) -> Mapping[str, Any]: ...


class ProposalLog(Protocol):
    """Where the proposed classes go (``backend.loop.acceptance.Proposals``)."""

    def record(self, project_key: str, items: Iterable[tuple[int | str, str, str]]) -> None: ...


class RetrainerHooks(Protocol):
    """What :class:`ValveModel` hands to the retrainer; each call is a few Redis writes."""

    def on_webhook(self, event: Mapping[str, Any]) -> Any: ...

    @property
    def proposals(self) -> ProposalLog: ...

    def register_project(self, ls_project_id: int, project_key: str | None = None) -> Any: ...


@dataclass(frozen=True)
class PredictContext:
    """Where the tasks of a ``predict`` call come from."""

    project: str | None = None
    """``"<id>.<created_ts>"`` (None when the caller did not say)."""
    label_config: str | None = None
    """The project's labeling config XML, as sent with the request."""


class ValveModel:
    """Label Studio's model class for valve identification; thread-safe."""

    def __init__(
        self,
        predictor: PredictorLike,
        fetcher: FetcherLike,
        *,
        settings: Settings,
        retrainer: RetrainerHooks | None = None,
    ) -> None:
        self.predictor = predictor
        self.fetcher = fetcher
        self.settings = settings
        self.retrainer = retrainer
        self._configs: OrderedDict[str, LabelConfig] = OrderedDict()
        self._default_config: LabelConfig | None = None
        self._lock = threading.Lock()
        self._outcomes: Counter[str] = Counter()
        self._told: set[tuple[object, ...]] = set()
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="valve-id-fetch")

    def close(self) -> None:
        """Stop the download threads (at app shutdown)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- setup --------------------------------------------------------------------------

    def setup(self, request: SetupRequest) -> dict[str, str]:
        """Check and remember a project's config; answer the served version.

        Raises :class:`LabelConfigError` for a config without ``<Image>``/``<Choices>``. A
        project whose classes differ from the served version's is still accepted (it may
        have added a valve model the next training run will learn); the difference is
        logged once per version and project (Label Studio calls ``/setup`` again on every
        project page), and predictions only ever propose classes the project's config has.
        """
        config = parse_label_config(request.label_config)
        self._remember_config(request.project, config)
        served = self._served_classes()
        if served is not None:
            unknown_to_model = [c for c in config.classes if c not in served]
            unknown_to_project = [c for c in served if c not in config.classes]
            version = self.predictor.version
            difference = (tuple(unknown_to_model), tuple(unknown_to_project))
            if (unknown_to_model or unknown_to_project) and self._first_time(
                "classes", version, request.project, difference
            ):
                logger.warning(
                    "project %s: classes differ from served version %s "
                    "(not learned yet: %s; not in the project: %s)",
                    request.project,
                    version,
                    unknown_to_model,
                    unknown_to_project,
                )
        if self.retrainer is not None:
            self._hook(
                "register_project", self.retrainer.register_project, request.ls_id, request.project
            )
        return {"model_version": self.predictor.version or NO_MODEL_VERSION}

    # -- predict ------------------------------------------------------------------------

    def predict(self, tasks: Sequence[Task], context: PredictContext) -> PredictResponse:
        """One result per task, in order; a task that cannot be served gets an empty result.

        The label config is the request's, else the one ``/setup`` remembered for the
        project, else valve-id's own (``VALVE_ID_LABEL_CONFIG``). Images are fetched in
        parallel threads and predicted in chunks of :data:`FETCH_CHUNK_TASKS`. If the served
        version proposes a class the project's config lacks, the most probable class the
        config *has* is proposed instead (the score stays the model's own uncertainty); with
        no such class the task's result is empty.
        """
        config = self._config_for(context)
        results = [TaskResult() for _ in tasks]
        version = self.predictor.version
        if version is None:
            self._count("no_model", len(tasks))
            if self._first_time("no model"):
                self.warn_if_no_model()
            return PredictResponse(results=results, model_version=NO_MODEL_VERSION)

        proposed: list[tuple[int, str, str]] = []
        for start in range(0, len(tasks), FETCH_CHUNK_TASKS):
            chunk = tasks[start : start + FETCH_CHUNK_TASKS]
            answers = prelabel(
                chunk,
                config=config,
                predictor=self.predictor,
                fetcher=self.fetcher,
                pool=self._pool,
            )
            for index, answer in enumerate(answers, start):
                self._count(answer.outcome)
                if answer.ok and answer.label is not None:
                    results[index] = TaskResult(
                        result=answer.result,
                        score=answer.score,
                        model_version=answer.model_version or version,
                    )
                    proposed.append((answer.task_id, answer.label, answer.model_version or version))
                else:
                    logger.info(
                        "task %s: no prediction (%s: %s)",
                        answer.task_id,
                        answer.outcome,
                        answer.reason,
                    )

        served_version = next(
            (r.model_version for r in reversed(results) if r.model_version), version
        )
        if proposed and context.project and self.retrainer is not None:
            self._hook(
                "proposals.record", self.retrainer.proposals.record, context.project, proposed
            )
        return PredictResponse(results=results, model_version=served_version)

    # -- fit ----------------------------------------------------------------------------

    def fit(self, event: str, data: Mapping[str, Any]) -> str:
        """Hand a webhook event to the retrainer; ``"accepted"``, or ``"logged"`` if it failed.

        The retrainer only records and enqueues (O(1) Redis work); training itself runs in an
        RQ worker. Never raises: a lost event is caught up by the periodic reconciliation.
        """
        if self.retrainer is None:
            logger.info("webhook %s logged: no retrainer configured", event)
            return "logged"
        try:
            self.retrainer.on_webhook(data)
        except Exception as exc:  # Redis down, ...: answer anyway, reconciliation catches up
            logger.warning("webhook %s not handed over: %s", event, type(exc).__name__)
            return "logged"
        return "accepted"

    def warn_if_no_model(self) -> None:
        """Say (WARNING) that no version is served and how to get one: at start-up, and at
        the first ``predict`` without one, whose empty answers would otherwise be silent."""
        if self.predictor.version is not None:
            return
        if self.predictor.load_error:
            logger.warning(
                "no model version served (%s): /predict answers empty results until one loads",
                self.predictor.load_error,
            )
            return
        logger.warning(
            "no model version in %s yet, so /predict answers empty results: label some tasks "
            "and press 'Start training' in Label Studio, or run "
            "`valve-id train --data <folder or labelstudio:<project id>> --enqueue`",
            self.settings.models,
        )

    def outcome_counts(self) -> dict[str, int]:
        """Tasks answered since start, by outcome (ok, no_image, fetch_error, ...)."""
        with self._lock:
            return dict(self._outcomes)

    # -- helpers ------------------------------------------------------------------------

    def _remember_config(self, key: str, config: LabelConfig) -> None:
        with self._lock:
            self._configs[key] = config
            self._configs.move_to_end(key)
            while len(self._configs) > _MAX_REMEMBERED_PROJECTS:
                self._configs.popitem(last=False)

    def _first_time(self, *key: object) -> bool:
        """Whether a notice about ``key`` is new (so each is logged once, not per request)."""
        with self._lock:
            if key in self._told:
                return False
            if len(self._told) >= _MAX_REMEMBERED_PROJECTS:
                self._told.clear()  # bounded; a notice repeated after that is harmless
            self._told.add(key)
            return True

    def _config_for(self, context: PredictContext) -> LabelConfig:
        if context.label_config:
            config = parse_label_config(context.label_config)
            if context.project:
                self._remember_config(context.project, config)
            return config
        if context.project:
            with self._lock:
                known = self._configs.get(context.project)
            if known is not None:
                return known
        if self._default_config is None:
            self._default_config = load_label_config(self.settings.label_config)
        return self._default_config

    def _served_classes(self) -> tuple[str, ...] | None:
        try:
            classes = self.predictor.info().get("classes")
        except Exception:  # info is best effort; predictions still carry their label
            return None
        return tuple(str(c) for c in classes) if classes else None

    def _count(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            self._outcomes[outcome] += n

    def _hook(self, name: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # bookkeeping must never cost the annotator an answer
            logger.warning("retrainer %s failed: %s", name, type(exc).__name__)
