"""The FastAPI application: ``uvicorn api.main:app`` (settings from the environment) or
``create_app(settings)``. Importing this module builds nothing; ``app`` is made on first access."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI

import akl_core
from api.core.auth import ApiKeyMiddleware
from api.core.config import Settings, get_settings
from api.core.errors import install_error_handlers
from api.core.input_checks import InputCheckMiddleware
from api.core.limits import MULTIPART_OVERHEAD, BodyLimitMiddleware
from api.metrics import Metrics, RequestMetricsMiddleware
from api.metrics import serve as serve_metrics
from api.queue import celery_client
from api.routes import api_router, health
from api.ui import DashboardFiles
from api.webhooks.deliverer import Deliverer

JSON_BODY_LIMIT = 1024 * 1024


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Background services of an API process: the webhook deliverer (AKL_WEBHOOKS_DELIVER) and the
    Prometheus server (AKL_METRICS_PORT). Their state is in the database, so a crash loses nothing."""
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    deliverer = None
    if settings.webhooks_deliver:
        deliverer = Deliverer(settings, on_attempt=metrics.on_webhook_attempt)
        deliverer.start()
    stop_metrics = serve_metrics(metrics, settings)
    try:
        yield
    finally:
        if deliverer is not None:
            await anyio.to_thread.run_sync(deliverer.stop)
        if stop_metrics is not None:
            await anyio.to_thread.run_sync(stop_metrics)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        lifespan=lifespan,
        title="akl-distill",
        version=akl_core.__version__,
        description="Distillation-as-a-service with Adaptive KL. Shapes follow the OpenAI fine-tuning jobs API.",
    )
    app.state.settings = settings
    app.state.celery = celery_client(settings)
    app.state.metrics = Metrics(settings)
    upload_limit = settings.max_upload_bytes + MULTIPART_OVERHEAD
    # Added first, so it runs inside the body limit (the last middleware added runs first).
    app.add_middleware(InputCheckMiddleware, max_json_bytes=JSON_BODY_LIMIT)
    app.add_middleware(
        BodyLimitMiddleware, limit_for=lambda path: upload_limit if path == "/v1/files" else JSON_BODY_LIMIT
    )
    # Last added, so first to run: a /v1 request without a valid key gets its 401 before anything.
    app.add_middleware(ApiKeyMiddleware, settings=settings)
    # Last, so it runs first and times every answer, refusals by the limits above included.
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(api_router)
    app.mount("/ui", DashboardFiles(), name="ui")
    return app


def __getattr__(name: str) -> Any:
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
