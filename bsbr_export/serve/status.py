"""What the server says about itself: ``GET /v1/models`` (the one model it holds), ``GET /health``
(200 while the scheduler runs, 503 otherwise) and ``GET /metrics`` (Prometheus text format)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .metrics import CONTENT_TYPE_LATEST
from .server import server_of


def add_routes(app) -> None:
    """Register the health, models and metrics routes on ``app`` (``app.create_app``)."""

    @app.get("/health")
    async def health(request: Request):
        srv = server_of(request.app)
        ok = srv.scheduler.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "free_rows": srv.scheduler.free_rows(),
                             "max_batch": srv.scheduler.max_batch}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        srv = server_of(request.app)
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": srv.created,
                                            "owned_by": "bsbr-export", "max_model_len": srv.max_len}]}

    @app.get("/metrics")
    async def metrics(request: Request):
        srv = server_of(request.app)
        return Response(srv.metrics.render(srv.scheduler), media_type=CONTENT_TYPE_LATEST)
