"""The HTTP service Label Studio talks to, as a FastAPI app.

Endpoints: ``/health``, ``/setup``, ``/predict``, ``/webhook`` (Label Studio's ML-backend
protocol), ``/metrics`` (Prometheus text) and ``/jobs`` (training runs and queue lengths).

:func:`create_app` takes the settings and, optionally, every part it would otherwise build
itself — predictor, image fetcher, Label Studio client, Redis, retrainer. That is the seam
tests use (small fakes, a stand-in Label Studio) and the end-to-end suite uses
(the real server). Heavy work (image downloads, inference) runs in worker threads, never on
the event loop; ``/webhook`` hands the event over within :data:`WEBHOOK_BUDGET_S` whatever
happens, because Label Studio waits at most one second for it and never retries.

Errors are JSON ``{"error": message}``: malformed JSON 400, wrong shapes 422, oversized
bodies 413, a bad label config 400, Label Studio failing 502, anything unexpected 500 —
without a traceback or a secret in the body (the traceback goes to the log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ValidationError
from redis import Redis
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from backend.service.labelstudio import (
    PredictRequest,
    SetupRequest,
    WebhookEvent,
    image_fetcher,
    label_studio_client,
)
from backend.service.metrics import StateCollector
from backend.service.middleware import BasicAuth, BodyLimit
from backend.service.valve_model import PredictContext, ValveModel
from backend.settings import Settings
from training.labelstudio import LabelStudio
from training.shared.errors import (
    DatasetError,
    ImageDecodeError,
    LabelConfigError,
    LabelStudioError,
    ModelLoadError,
    ModelNotFound,
    RegistryError,
    ValveIdError,
)

__all__ = [
    "DEFAULT_PORT",
    "MAX_BODY_BYTES",
    "MAX_TASKS_PER_PREDICT",
    "REDIS_SOCKET_TIMEOUT_S",
    "WEBHOOK_BUDGET_S",
    "app_from_env",
    "create_app",
    "run",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 9090
"""Label Studio ML backends conventionally listen on 9090."""
MAX_BODY_BYTES = 10 * 1024 * 1024
"""Largest request body accepted (bytes); a /predict of 1000 tasks is well under 1 MB."""
MAX_TASKS_PER_PREDICT = 1000
"""Tasks per /predict; larger requests get 413 (re-scoring a whole project is a job)."""
WEBHOOK_BUDGET_S = 0.05
"""Time /webhook waits for the hand-off to the retrainer before answering anyway (seconds)."""
REDIS_SOCKET_TIMEOUT_S = 0.2
"""Connect/read timeout of the app's Redis client: a dead Redis never stalls a request."""
RECENT_RUNS = 20
"""Training runs listed by /jobs (newest first)."""
WEBHOOK_THREADS = 4
"""Threads that hand webhook events to Redis (each hand-off is a few Redis commands)."""
_MAX_RUN_KEYS = 500
"""Run records /jobs looks at (a SCAN of a Redis holding many years of runs stays short)."""
_KNOWN_ACTIONS = frozenset(
    {
        "ANNOTATION_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATIONS_CREATED",
        "ANNOTATIONS_DELETED",
        "TASKS_CREATED",
        "TASKS_DELETED",
        "PROJECT_CREATED",
        "PROJECT_UPDATED",
        "PROJECT_DELETED",
        "START_TRAINING",
    }
)
_STATUS_FOR: tuple[tuple[type[ValveIdError], int], ...] = (
    (LabelConfigError, 400),
    (ImageDecodeError, 400),
    (DatasetError, 400),
    (LabelStudioError, 502),
    (ModelNotFound, 404),
    (ModelLoadError, 503),
    (RegistryError, 409),
)


def create_app(
    settings: Settings,
    *,
    predictor: Any = None,
    fetcher: Any = None,
    label_studio: LabelStudio | None = None,
    redis: Redis | None = None,
    retrainer: Any = None,
) -> FastAPI:
    """The FastAPI app; parts not given are built from ``settings``.

    ``predictor`` (:class:`backend.service.predictor.Predictor` on ``settings.models``), ``fetcher``
    (:class:`training.labelstudio.ImageFetcher`, authenticated with ``label_studio``'s token),
    ``label_studio`` (:class:`training.labelstudio.LabelStudio`), ``redis`` (from
    ``REDIS_URL``, short timeouts) and ``retrainer`` (:class:`backend.loop.retraining.Retrainer`)
    are the seams: pass fakes in tests, the real parts in production.
    """
    owned: list[Any] = []  # parts built here, closed at shutdown
    label_studio = label_studio if label_studio is not None else label_studio_client(settings)
    if predictor is None:
        predictor = _default_predictor(settings)
        owned.append(predictor)
    if fetcher is None:
        fetcher = _default_fetcher(settings, label_studio)
        owned.append(fetcher)
    if redis is None:
        redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=REDIS_SOCKET_TIMEOUT_S,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
        )
        owned.append(redis)
    if retrainer is None:
        retrainer = _default_retrainer(settings, redis, label_studio)
    model = ValveModel(predictor, fetcher, settings=settings, retrainer=retrainer)
    webhook_pool = ThreadPoolExecutor(WEBHOOK_THREADS, thread_name_prefix="valve-id-webhook")
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StateCollector(model, predictor, retrainer.proposals.per_version))
    predict_seconds = Histogram(
        "valve_id_predict_request_seconds",
        "Wall time of one /predict request",
        buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 100.0),
        registry=registry,
    )
    webhook_events = Counter(
        "valve_id_webhook_events",
        "Webhook events received, by action",
        ["action"],
        registry=registry,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_refresh, predictor)  # load the served version before traffic
        model.warn_if_no_model()
        reconciler = asyncio.create_task(_reconcile_periodically(redis, settings))
        yield
        reconciler.cancel()
        model.close()
        webhook_pool.shutdown(wait=False, cancel_futures=True)
        for part in owned:
            try:
                part.close()
            except Exception as exc:  # shutting down anyway
                logger.debug("closing %s failed: %s", type(part).__name__, exc)

    app = FastAPI(title="valve-id", summary="Label Studio ML backend", lifespan=lifespan)
    app.state.settings = settings
    app.state.model = model
    app.state.redis = redis
    app.state.label_studio = label_studio
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness for Label Studio (``status: UP``) and which version is served."""
        version = predictor.version
        return {
            "status": "UP",
            "model_class": type(model).__name__,
            "model_version": version,
            "model_loaded": version is not None,
            "model_dir": str(settings.models),
            "load_error": predictor.load_error,
        }

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, str]:
        """Label Studio connects a project: check its config, answer the served version."""
        body = _parse(SetupRequest, await _json_body(request))

        def work() -> dict[str, str]:
            _refresh(predictor)
            return model.setup(body)

        return await run_in_threadpool(work)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        """Pre-annotate tasks: one result per task, in order."""
        payload = await _json_body(request)
        tasks = payload.get("tasks") if isinstance(payload, dict) else None
        if isinstance(tasks, list) and len(tasks) > MAX_TASKS_PER_PREDICT:
            raise HTTPException(
                413,
                f"{len(tasks)} tasks in one /predict; at most {MAX_TASKS_PER_PREDICT} are "
                "served per request (select fewer tasks, or let the re-scoring job do it)",
            )
        body = _parse(PredictRequest, payload)
        context = PredictContext(project=body.project, label_config=body.label_config)

        def work() -> dict[str, Any]:
            _refresh(predictor)
            return model.predict(body.tasks, context).to_json()

        started = time.perf_counter()
        try:
            answer = await run_in_threadpool(work)
        finally:
            predict_seconds.observe(time.perf_counter() - started)
        return JSONResponse(answer)

    @app.post("/webhook")
    async def webhook(request: Request) -> dict[str, str]:
        """Hand the event to the retrainer and answer at once (Label Studio waits ≤ 1 s)."""
        payload = await _json_body(request)
        if not isinstance(payload, dict) or not isinstance(payload.get("action"), str):
            raise HTTPException(400, "a webhook body is a JSON object with an 'action'")
        event = _parse(WebhookEvent, payload)
        webhook_events.labels(event.action if event.action in _KNOWN_ACTIONS else "other").inc()
        loop = asyncio.get_running_loop()
        handoff = loop.run_in_executor(webhook_pool, model.fit, event.action, payload)
        try:
            status = await asyncio.wait_for(handoff, WEBHOOK_BUDGET_S)
        except TimeoutError:
            logger.warning(
                "webhook %s: hand-off slower than %.0f ms; answered without waiting",
                event.action,
                WEBHOOK_BUDGET_S * 1000,
            )
            status = "logged"
        return {"status": status}

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text: predictions, latency, cache, served version, webhooks, acceptance."""
        text = await run_in_threadpool(generate_latest, registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/jobs")
    async def jobs() -> dict[str, Any]:
        """Recent training runs (newest first) and the length of each queue."""
        return await run_in_threadpool(_jobs, redis)

    # Outermost last: auth refuses before any body is read; the size limit guards parsing.
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    if settings.basic_auth_enabled:
        app.add_middleware(
            BasicAuth, user=settings.basic_auth_user, password=settings.basic_auth_pass
        )
    return app


async def _reconcile_periodically(redis: Any, settings: Settings) -> None:
    """Every interval, enqueue one reconciliation job (a dropped webhook never loses a run).

    Several backend processes may run this loop; a ``SET NX`` key lets one of them enqueue
    per interval. Redis being down only delays it to the next tick.
    """
    from backend.loop.jobs import JobQueue

    interval = settings.reconcile_interval_s
    while True:
        await asyncio.sleep(interval)
        try:
            await run_in_threadpool(JobQueue(redis).schedule_reconcile, interval)
        except Exception as exc:  # Redis down or similar: try again next interval
            logger.warning("could not schedule reconciliation: %s", exc)


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` and multi-worker runs: settings from the env."""
    return create_app(Settings.from_env())


def run(
    settings: Settings, host: str = "0.0.0.0", port: int = DEFAULT_PORT, workers: int = 1
) -> None:
    """Serve with uvicorn (what ``valve-id serve`` calls).

    One worker serves the app built from ``settings``. With ``workers > 1`` each worker
    process builds its own app from the environment (:func:`app_from_env`), so pass options
    as environment variables then; each worker loads the model and keeps its own /metrics.
    """
    import uvicorn

    log_level = settings.log_level.lower()
    if workers <= 1:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
    else:
        # Settings only a part checks (the fetcher's URLs) fail here, in one line; inside the
        # workers each would die with a traceback and uvicorn would start it again, forever.
        _default_fetcher(settings, label_studio_client(settings)).close()
        uvicorn.run(
            "backend.service.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
        )


# --------------------------------------------------------------------------------------------
# default parts


def _default_predictor(settings: Settings) -> Any:
    from backend.service.predictor import Predictor

    return Predictor(
        settings.open_registry(),
        acquisition=settings.acquisition,
        batch_size=settings.predict_batch_size,
        compile=settings.compile_model,
    )


def _default_fetcher(settings: Settings, label_studio: LabelStudio) -> Any:
    return image_fetcher(settings, auth_headers=label_studio.auth_headers)


def _default_retrainer(settings: Settings, redis: Redis, label_studio: LabelStudio) -> Any:
    from backend.loop.jobs import JobQueue
    from backend.loop.retraining import Retrainer

    return Retrainer(settings, redis, queue=JobQueue(redis), label_studio=label_studio)


def _refresh(predictor: Any) -> None:
    """Pick up a newly promoted version; on failure keep serving the old one."""
    try:
        predictor.refresh()
    except Exception as exc:  # the predictor reports it as load_error in /health
        logger.warning("model refresh failed: %s", type(exc).__name__)


# --------------------------------------------------------------------------------------------
# request parsing and errors


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise HTTPException(400, "the request body is empty; expected JSON")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, "the request body is not valid JSON") from None


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], payload: Any) -> M:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise HTTPException(422, _describe(exc.errors())) from None


def _describe(errors: Iterable[Mapping[str, Any]], limit: int = 5) -> str:
    """Pydantic errors as one line: where and what, never the offending input."""
    parts = []
    for error in list(errors)[:limit]:
        where = ".".join(str(p) for p in error.get("loc", ())) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def _add_error_handlers(app: FastAPI) -> None:
    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail), exc.headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _error(422, _describe(exc.errors()))

    async def valve_id_error(request: Request, exc: Exception) -> JSONResponse:
        status = next((code for cls, code in _STATUS_FOR if isinstance(exc, cls)), 500)
        logger.warning("%s %s: %s (%s)", request.method, request.url.path, type(exc).__name__, exc)
        return _error(status, str(exc))

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error(
            "%s %s failed", request.method, request.url.path, exc_info=(type(exc), exc, None)
        )
        return _error(500, "internal error; see the backend's log")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ValveIdError, valve_id_error)
    app.add_exception_handler(Exception, unexpected_error)


# --------------------------------------------------------------------------------------------
# /jobs


def _jobs(redis: Redis) -> dict[str, Any]:
    from redis.exceptions import RedisError
    from rq import Queue

    from training.shared import loop_state
    from training.shared.loop_state import DEFAULT_QUEUE, TRAINING_QUEUE, run_status

    try:
        run_ids = sorted(loop_state.run_ids(redis, limit=_MAX_RUN_KEYS), reverse=True)
        run_ids = run_ids[:RECENT_RUNS]
        runs = [{"run_id": run_id, **run_status(redis, run_id)} for run_id in run_ids]
        queues = {
            name: Queue(name, connection=redis).count for name in (TRAINING_QUEUE, DEFAULT_QUEUE)
        }
    except RedisError as exc:
        raise HTTPException(503, f"Redis is unavailable ({type(exc).__name__})") from None
    return {"runs": runs, "queues": queues}
