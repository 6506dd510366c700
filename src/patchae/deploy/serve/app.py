"""The station's HTTP API (FastAPI) and ``python serve.py``'s task (uvicorn).

FastAPI + uvicorn rather than LitServe: async handlers read the body as a stream (the upload limit holds before
a large body is read), the dynamic batcher is a few dozen lines we control (its batch also commits the audit rows
together), both are plain pip installs, and tests run a real uvicorn server on a free port.

    POST /predict         an image (raw body or multipart) -> decision, scores, threshold, model id, latency,
                          overlay link; one audit row per request, committed before the response
    GET  /                the live page (page.py)
    GET  /health          liveness, queue length, images scored
    GET  /model           category, model, backbone, input size, threshold, training metrics
    GET  /history         audit rows, newest first (?limit=&before=), or all as CSV (?format=csv)
    GET  /stats           pass / fail counts and the normalised-score histogram of this model
    GET  /overlays/<id>.png   the anomaly-map overlay of a request

Every error is ``{"error": "<one line that says what to do>"}`` with a 4xx (the request) or 500 (the station);
no request stops the service.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from patchae.deploy.serve import audit
from patchae.deploy.serve.audit import AuditRow, utc_now
from patchae.deploy.serve.auth import check_client
from patchae.deploy.serve.batching import Busy
from patchae.deploy.serve.page import page_html
from patchae.deploy.serve.station import Station, StationSettings
from patchae.deploy.serve.uploads import Refused, check_content_type, read_upload
from patchae.errors import PatchAEError

log = logging.getLogger(__name__)

OVERLAY_NAME = re.compile(r"^([0-9a-f]{32})\.png$")
REQUEST_ID = "X-Request-Id"  # on every /predict answer: the audit row's request_id, refusals included
OVERLAY_WAIT_S = 30.0  # an overlay is drawn just after its answer; a link followed at once waits for it


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


def one_line(message: object) -> str:
    text = str(message).strip()
    return text.splitlines()[0][:300] if text else "unknown error"


def create_app(station: Station) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(station.close)

    app = FastAPI(title="patchae screening station", lifespan=lifespan, docs_url=None, redoc_url=None)

    # -- errors: one JSON line each, the station keeps serving ---------------------------------------------
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"{request.url.path} does not exist; see GET / for the page and the API"}.get(
            exc.status_code, str(exc.detail)
        )
        return error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "query")
        return error(422, f"bad {where or 'request'}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error(500, f"the station failed ({type(exc).__name__}: {one_line(exc)}); see its log")

    # -- scoring ------------------------------------------------------------------------------------------
    @app.post("/predict")
    async def predict(request: Request) -> Response:
        started, arrived, request_id = time.perf_counter(), utc_now(), uuid.uuid4().hex
        client = request.client.host if request.client else "unknown"
        body = None
        try:
            check_client(client, request.headers.get("authorization"), station.token)
            check_content_type(request)
            body = await read_upload(request, station.limits)
            job = await run_in_threadpool(station.accept, body, request_id, arrived, started, client)
            row: AuditRow = await station.batcher.submit(job)
        except (Refused, Busy) as refusal:
            status, message = (
                (refusal.status, refusal.message)
                if isinstance(refusal, Refused)
                else (503, f"the station is busy ({refusal}); retry in a moment")
            )
            row = station.refusal_row(request_id, arrived, started, client, status, message, body)
        except Exception as failure:
            log.exception("request %s failed", request_id)
            message = f"the station failed on this image ({type(failure).__name__}: {one_line(failure)}); see its log"
            row = station.refusal_row(request_id, arrived, started, client, 500, message, body)
        else:
            return JSONResponse(station.answer(row), headers={REQUEST_ID: request_id})
        # A refused or failed request is recorded too, before its answer; no record, no answer.
        try:
            await run_in_threadpool(station.audit.write, [row])
        except Exception:
            log.exception("cannot write the audit row of request %s", request_id)
            return error(
                500, f"the audit log {station.audit_path} cannot be written; the request was not processed"
            )
        headers = {REQUEST_ID: request_id}
        if row.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return error(row.status, row.error or "refused", headers)

    # -- reading ------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html(station.settings.latest))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return station.health()

    @app.get("/model")
    async def model() -> dict[str, Any]:
        return station.info

    @app.get("/history", response_model=None)
    async def history(
        limit: int = Query(50, ge=1, le=1000),
        before: int | None = Query(None, ge=1),
        format: str = Query("json", pattern="^(json|csv)$"),
    ) -> Response:
        if format == "csv":
            return StreamingResponse(
                audit.csv_lines(station.audit_path),
                media_type="text/csv",
                headers={"Content-Disposition": 'attachment; filename="audit.csv"'},
            )
        rows = await run_in_threadpool(audit.page, station.audit_path, limit, before)
        for row in rows:
            row["overlay"] = f"/{row['overlay_path']}" if row["overlay_path"] else None
        following = f"/history?limit={limit}&before={rows[-1]['id']}" if len(rows) == limit else None
        return JSONResponse({"rows": rows, "next": following})

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        counts = station.audit.tally.snapshot()
        return {**counts, "model_id": station.model_id, "threshold": station.info["threshold"]["value"]}

    @app.get("/overlays/{name}")
    async def overlay(name: str) -> Response:
        match = OVERLAY_NAME.match(name)
        if match is None:
            return error(
                404, f"/overlays/{name} is not an overlay name; use the overlay link a prediction returned"
            )
        pending = station.overlay_pending(match.group(1))
        if pending is not None:
            try:
                await asyncio.wait_for(asyncio.wrap_future(pending), OVERLAY_WAIT_S)
            except TimeoutError:
                return error(503, "the overlay is still being drawn; retry in a moment")
        path = station.folder / "overlays" / name
        if not path.is_file():
            return error(404, f"no overlay {name} (overlays=false, or the station stopped before drawing it)")
        return FileResponse(path, media_type="image/png")

    return app


# -- python serve.py --------------------------------------------------------------------------------------
def check_port(host: str, port: int) -> None:
    """A one-line error for a port that is taken, before the model is loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as failure:
            hint = "pick another: port=<n>" if failure.errno == errno.EADDRINUSE else "check host="
            raise PatchAEError(f"cannot listen on {host}:{port} ({failure.strerror}); {hint}") from None


def run(cfg: Any) -> None:
    """serve.py's task: load the model, then serve until SIGINT / SIGTERM (a user error: one line, exit 1)."""
    import uvicorn

    try:
        if isinstance(cfg.port, bool) or not isinstance(cfg.port, int) or not 0 <= cfg.port <= 65535:
            raise PatchAEError(f"port={cfg.port} must be an integer 0..65535")
        settings = StationSettings.from_config(cfg)
        check_port(str(cfg.host), int(cfg.port))  # before the model loads: a taken port fails at once
        station = Station(settings)
    except PatchAEError as failure:
        print(f"error: {one_line(failure)}", file=sys.stderr)
        sys.exit(1)
    record = {**asdict(settings), "token": "<set>" if station.token else None, "model": station.info}
    (station.folder / "station.json").write_text(json.dumps(record, indent=2, default=str))
    where = f"http://{'[' + cfg.host + ']' if ':' in str(cfg.host) else cfg.host}:{cfg.port}/"
    print(
        f"station ready at {where} (model {station.model_id}, {station.predictor.runtime} on "
        f"{station.predictor.device}); audit log {station.audit_path}",
        flush=True,
    )
    if station.token is None and str(cfg.host) not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no auth token: only this machine may post images; set PATCHAE_SERVE_TOKEN for others")
    uvicorn.run(
        create_app(station),
        host=str(cfg.host),
        port=int(cfg.port),
        log_config=None,  # uvicorn logs through the root logger Hydra set up (console and serve.log)
        access_log=bool(cfg.access_log),
        limit_concurrency=cfg.limit_concurrency,
        timeout_graceful_shutdown=10,
        server_header=False,
    )
