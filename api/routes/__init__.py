"""The versioned API: every route here needs an API key (health routes live outside /v1)."""

from fastapi import APIRouter

from api.routes import checkpoints, files, job_history, jobs, spec

api_router = APIRouter(prefix="/v1")
api_router.include_router(files.router)
api_router.include_router(jobs.router)
api_router.include_router(job_history.router)
api_router.include_router(checkpoints.router)
api_router.include_router(spec.router)
