"""The captioning service: a FastAPI app over the dynamic batcher.

Endpoints:

* ``POST /v1/caption``: images (multipart files or base64 JSON) -> one result per
  image, ``{"index", "name", "caption"}`` or ``{"index", "name", "error", "reason",
  "status"}``. A bad image costs only its own result: the response is 200 when any
  image was captioned; when none was, its status is the images' common 4xx (400 when
  they differ) and the body names the first error.
* ``GET /healthz``: the process is alive (503 when the model failed to load, or the
  model thread died: nothing will be served until a restart).
* ``GET /readyz``: the model is loaded and warmed and the service is not draining.
* ``GET /metrics``: Prometheus text format.

The model loads in the background after startup, so liveness answers at once and
readiness turns 200 when the warm-up is done (one caption; an engine that compiles
captions one batch per batch bucket, `Captioner.warm_up`). On shutdown
(uvicorn stops accepting and waits for open requests on SIGTERM) the batcher finishes
everything queued before the model thread stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from vlv_engine.images import ImageInputError
from vlv_engine.serve.batcher import DynamicBatcher, QueueFull, ShuttingDown, WorkerDied
from vlv_engine.serve.captioner import CaptionJob, Captioner
from vlv_engine.serve.config import ServeConfig
from vlv_engine.serve.errors import ServiceError, image_error
from vlv_engine.serve.limits import BodyLimitMiddleware
from vlv_engine.serve.metrics import MetricsMiddleware, ServiceMetrics
from vlv_engine.serve.parsing import Upload, read_request

log = logging.getLogger(__name__)


@dataclass
class ServiceState:
    config: ServeConfig
    metrics: ServiceMetrics
    captioner: Captioner | None = None
    batcher: DynamicBatcher | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    loader: asyncio.Task | None = field(default=None, repr=False)


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def create_app(engine: Any = None, *, engine_factory: Callable[[], Any] | None = None,
               config: ServeConfig | None = None, on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """An app serving `engine`, or the engine `engine_factory()` builds (in a thread,
    after startup). Exactly one of the two. `on_load_error(message)` is called if the
    model fails to load or warm up (the server uses it to exit)."""
    if (engine is None) == (engine_factory is None):
        raise ValueError("pass an engine or an engine_factory (exactly one)")
    config = config or ServeConfig()
    state = ServiceState(config=config, metrics=ServiceMetrics(config.max_batch_size))

    async def load() -> None:
        try:
            model = engine if engine is not None else await asyncio.to_thread(engine_factory)
            captioner = Captioner(model, max_pixels=config.max_pixels)
            batcher = DynamicBatcher(captioner.run_batch, max_batch_size=config.max_batch_size,
                                     max_delay_s=config.max_delay_s, max_queue=config.max_queue,
                                     on_batch=state.metrics.observe_batch,
                                     on_queue_depth=state.metrics.queue_depth.set)
            await batcher.start()
            state.captioner, state.batcher = captioner, batcher
            if config.torch_threads is not None:
                await batcher.run_in_worker(lambda: _set_torch_threads(config.torch_threads))
            await batcher.run_in_worker(lambda: captioner.warm_up(config.max_batch_size))
            state.ready = True
            state.metrics.ready.set(1)
            log.info("model loaded and warmed; ready")
        except Exception as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("the model failed to load")
            if on_load_error is not None:
                on_load_error(state.load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loader = asyncio.create_task(load(), name="vlv-load")
        yield
        # uvicorn has stopped accepting and waited for open requests; finish the queue.
        state.ready, state.draining = False, True
        state.metrics.ready.set(0)
        if not state.loader.done():
            state.loader.cancel()
        await asyncio.gather(state.loader, return_exceptions=True)
        if state.batcher is not None:
            await state.batcher.close()
        log.info("batcher drained; stopped")

    app = FastAPI(title="vlv-engine captioning", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = state

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, err: ServiceError):
        state.metrics.request_errors.labels(err.reason).inc()
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        reason = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return JSONResponse({"error": str(err.detail), "reason": reason}, status_code=err.status_code,
                            headers=err.headers)

    def worker_failure() -> str | None:
        return state.batcher.failure if state.batcher is not None else None

    @app.get("/healthz")
    async def healthz():
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error, "reason": "model_failed"}, 503)
        if (failure := worker_failure()) is not None:  # alive, but serving nothing: restart it
            return JSONResponse({"status": "failed", "error": failure, "reason": "worker_died"}, 503)
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if state.ready and state.batcher is not None and state.batcher.accepting:
            return {"status": "ready", "model": config.model_name}
        if state.load_error is not None:
            return JSONResponse({"error": state.load_error, "reason": "model_failed"}, 503)
        if (failure := worker_failure()) is not None:
            return JSONResponse({"error": failure, "reason": "worker_died"}, 503)
        reason = "draining" if state.draining else "loading"
        return JSONResponse({"error": f"not ready ({reason})", "reason": reason}, 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.post("/v1/caption")
    async def caption(request: Request):
        if not state.ready or state.batcher is None:
            if state.draining:
                raise ServiceError(503, "shutting_down", "the service is shutting down")
            raise ServiceError(503, "not_ready", "the model is not loaded yet; see GET /readyz")
        try:
            return await asyncio.wait_for(_caption(request), config.timeout_s)
        except asyncio.TimeoutError:
            raise ServiceError(504, "timeout", f"no answer within the request timeout "
                                               f"({config.timeout_s:g} s)") from None

    async def _caption(request: Request):
        try:
            uploads, options = await read_request(request, config)
        except ClientDisconnect:
            # Nobody reads the answer; counted apart from the server's own errors (nginx's 499).
            raise ServiceError(499, "client_disconnected", "the client closed the connection during the "
                                                           "upload") from None
        prepared = await asyncio.gather(*(_prepare(i, u) for i, u in enumerate(uploads)))
        good = [i for i, p in enumerate(prepared) if not isinstance(p, ServiceError)]
        try:
            captions = await state.batcher.submit_many([CaptionJob(prepared[i], options) for i in good])
        except QueueFull as exc:
            raise ServiceError(503, "overloaded", str(exc)) from None
        except ShuttingDown as exc:
            raise ServiceError(503, "shutting_down", str(exc)) from None
        except WorkerDied as exc:
            raise ServiceError(503, "worker_died", str(exc)) from None
        outcome: list[Any] = list(prepared)
        for i, value in zip(good, captions):
            if isinstance(value, BaseException):
                log.error("captioning image %d failed", i, exc_info=value)
                value = ServiceError(500, "internal_error", f"image {i} ({uploads[i].name!r}): captioning "
                                                            f"failed ({type(value).__name__}: {value})")
            outcome[i] = value
        return _respond(uploads, outcome)

    async def _prepare(index: int, upload: Upload):
        """The decoded image, or the ServiceError for this item."""
        if upload.error is not None:
            return upload.error
        try:
            return await asyncio.to_thread(state.captioner.prepare, upload.data)
        except ImageInputError as err:
            return image_error(err, index, upload.name)
        except Exception as exc:  # a decoder bug costs this image, not the request
            log.warning("unexpected error decoding image %d", index, exc_info=True)
            return ServiceError(400, "bad_image", f"image {index} ({upload.name!r}): cannot decode "
                                                  f"({type(exc).__name__}: {exc})")

    def _respond(uploads: list[Upload], outcome: list[Any]) -> JSONResponse:
        results, errors = [], []
        for i, (upload, value) in enumerate(zip(uploads, outcome)):
            if isinstance(value, ServiceError):
                errors.append(value)
                state.metrics.failures.labels(value.reason).inc()
                results.append({"index": i, "name": upload.name, **value.body(), "status": value.status})
            else:
                results.append({"index": i, "name": upload.name, "caption": value})
        captioned = len(results) - len(errors)
        state.metrics.images.inc(captioned)
        body = {"model": config.model_name, "results": results, "captioned": captioned, "failed": len(errors)}
        if captioned:
            return JSONResponse(body)
        statuses = {e.status for e in errors}
        status = statuses.pop() if len(statuses) == 1 else (500 if 500 in statuses else 400)
        reasons = {e.reason for e in errors}
        summary = errors[0].message if len(errors) == 1 else f"none of the {len(errors)} images was captioned; " \
                                                             f"first: {errors[0].message}"
        return JSONResponse({"error": summary, "reason": reasons.pop() if len(reasons) == 1 else "bad_images",
                             **body}, status_code=status)

    # Outermost first: metrics see every response, the 413s of the body limit included.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app
