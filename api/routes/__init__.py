"""The versioned API: every route here needs an API key (health routes live outside /v1)."""

from fastapi import APIRouter

from api.core.errors import error_responses
from api.routes import (
    checkpoints,
    files,
    fine_tuning,
    job_history,
    jobs,
    models,
    spec,
    teacher_caches,
    webhooks,
)

# Statuses any /v1 route may answer; each route adds its own (404, 409, 413, 429).
api_router = APIRouter(prefix="/v1", responses=error_responses(400, 401, 422, 503))
api_router.include_router(files.router)
api_router.include_router(jobs.router)
api_router.include_router(job_history.router)
api_router.include_router(checkpoints.router)
api_router.include_router(spec.router)
api_router.include_router(webhooks.router)
api_router.include_router(teacher_caches.router)
api_router.include_router(models.router)
api_router.include_router(fine_tuning.router)
