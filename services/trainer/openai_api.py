"""The trainer's OpenAI-compatible HTTP front: /v1/files and /v1/fine_tuning/jobs over TrainerCore.

A thin front, as the gRPC servicer is: the stock OpenAI clients upload files (TuneDock datasets,
the same ids `tunedock data ls` shows), create fine-tuning jobs (openai_jobs.py maps OpenAI's
request onto a JobSpec over the four methods), follow their events and checkpoints, cancel them,
and read their metrics CSV. The same jobs are TuneDock jobs, seen and cancelled through gRPC and
the CLI alike; the caller's token and projects decide what it sees (the `OpenAI-Project` header,
which the SDKs send from their `project` option, picks the project among the caller's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.common.auth import Authenticator, Principal, current_principal
from services.common.http import HttpError, authenticate, openai_app
from services.common.pages import token_after
from services.trainer import openai_jobs as oj
from services.trainer.core import FOLLOWS_LABEL, TrainerCore
from services.trainer.data.sources import SourceOptions
from services.trainer.store import JobRecord
from tunedock import errors

READ, SUBMIT = "trainer.read", "trainer.submit"
UPLOAD_CHUNK = 1 << 20
FORM_OVERHEAD = 1 << 16
"""Bytes a multipart form adds around its file (boundaries, headers, the purpose field), generously."""


@dataclass
class FineTuningFront:
    core: TrainerCore
    authenticator: Authenticator | None
    metrics: object = None

    async def call(self, request: Request, role: str, fn: Callable, *args: Any) -> Any:
        """`fn(*args)` as the request's caller: a core coroutine function awaited, a sync one in a thread."""
        token = current_principal.set(self.caller(request, role))
        try:
            if asyncio.iscoroutinefunction(fn):
                return await fn(*args)
            return await asyncio.to_thread(fn, *args)
        finally:
            current_principal.reset(token)

    def caller(self, request: Request, role: str) -> Principal:
        return authenticate(request, self.authenticator, role)

    @staticmethod
    def project(request: Request) -> str:
        """The project a request names (OpenAI-Project header); "" for the caller's default."""
        return request.headers.get("openai-project", "")

    # ------------------------------------------------------------------------------ files

    async def upload(self, request: Request) -> dict:
        caller = self.caller(request, SUBMIT)
        # The form is spooled to disk before the core sees a byte: an upload over the limit is refused
        # by its declared length first (the core still checks the bytes as they arrive).
        declared = int(request.headers.get("content-length") or 0)
        if declared > self.core.max_dataset_bytes + FORM_OVERHEAD:
            limit = self.core.max_dataset_bytes / 2**20
            raise errors.ResourceExhausted(
                f"the upload is {declared / 2**20:.1f} MiB, above the dataset limit of {limit:.0f} MiB: split it "
                "into several files, or raise the trainer's --max-dataset-mb (TUNEDOCK_TRAINER_MAX_DATASET_MB)"
            )
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as exc:  # starlette's MultiPartException, a body that is not multipart
            raise HttpError(400, f"send the file as multipart/form-data with fields file and purpose: {exc}") from None
        try:
            purpose, upload = form.get("purpose"), form.get("file")
            if purpose != "fine-tune":
                raise HttpError(
                    400, f"purpose must be 'fine-tune' (files here are training data), got {purpose!r}", "purpose"
                )
            if upload is None or isinstance(upload, str):
                raise HttpError(400, "the form has no file field: send the dataset as `file`", "file")
            token = current_principal.set(caller)
            try:
                row = await asyncio.to_thread(self._store, upload.file, upload.filename or "", self.project(request))
            finally:
                current_principal.reset(token)
        finally:
            await form.close()
        return oj.file_object(row)

    def _store(self, source, name: str, project: str):
        upload = self.core.begin_upload(name, "", project, SourceOptions())
        try:
            while chunk := source.read(UPLOAD_CHUNK):
                upload.write(chunk)
            return upload.finish()
        finally:
            upload.close()

    async def list_files(self, request: Request) -> dict:
        q = request.query_params
        purpose = q.get("purpose")
        limit = _limit(q.get("limit"), 10000)
        if purpose not in (None, "fine-tune"):
            return {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
        after = q.get("after")
        token = ""
        if after:
            row = await self.call(request, READ, self.core.get_dataset, after)
            token = token_after(row.created_at.isoformat(), row.id)
        page = await self.call(request, READ, self.core.list_datasets, limit, token, self.project(request))
        data = [oj.file_object(r) for r in page.items]
        return _list(data, bool(page.next_token))

    async def get_file(self, request: Request, file_id: str) -> dict:
        if file_id.startswith(oj.RESULTS_PREFIX):
            job = await self.call(request, READ, self.core.get_job, file_id.removeprefix(oj.RESULTS_PREFIX))
            return oj.results_file_object(job, len(await self._results(request, job)))
        return oj.file_object(await self.call(request, READ, self.core.get_dataset, file_id))

    async def delete_file(self, request: Request, file_id: str) -> dict:
        if file_id.startswith(oj.RESULTS_PREFIX):
            raise HttpError(400, "a job's result file goes with the job; it cannot be deleted on its own", "file_id")
        row = await self.call(request, SUBMIT, self.core.delete_dataset, file_id)
        return {"id": row.id, "object": "file", "deleted": True}

    async def file_content(self, request: Request, file_id: str) -> Response:
        if file_id.startswith(oj.RESULTS_PREFIX):
            job = await self.call(request, READ, self.core.get_job, file_id.removeprefix(oj.RESULTS_PREFIX))
            return Response(await self._results(request, job), media_type="text/csv")
        chunks = await self.call(request, READ, self.core.dataset_content, file_id)
        return StreamingResponse(_threaded(chunks), media_type="application/octet-stream")

    async def preview(self, request: Request, file_id: str) -> dict:
        """TuneDock's own: the first records as the base sees them (loss tokens marked), token lengths."""
        q = request.query_params
        return await self.call(
            request,
            READ,
            self.core.preview_dataset,
            file_id,
            q.get("model", "").removeprefix("auto"),
            _int(q, "max_length", 512),
            _int(q, "records", 3),
            _int(q, "sample", 1000),
        )

    async def plan(self, request: Request) -> dict:
        """TuneDock's own: each method's estimated peak memory for these knobs (`tunedock plan`)."""
        q = request.query_params
        return await self.call(
            request,
            READ,
            self.core.plan,
            q.get("model", "").removeprefix("auto"),
            _int(q, "batch_size", 4),
            _int(q, "max_seq_length", 512),
            _int(q, "r", 16),
            _int(q, "trainable_layers", 2),
            q.get("gradient_checkpointing", "false").lower() in ("1", "true", "yes"),
            q.get("device", ""),
        )

    async def _results(self, request: Request, job: JobRecord) -> bytes:
        events = await self.call(request, READ, self.core.job_events, job.id)
        return oj.results_csv(events)

    # ------------------------------------------------------------------------------- jobs

    async def create_job(self, request: Request) -> dict:
        body = await _json(request)
        caller = self.caller(request, SUBMIT)
        spec = oj.job_spec(body, self.core.default_base(), self.project(request))
        token = current_principal.set(caller)
        try:
            job = await self.core.submit(spec)
        finally:
            current_principal.reset(token)
        return oj.job_object(job)

    async def _job(self, request: Request, job_id: str) -> tuple[JobRecord, JobRecord | None]:
        job = await self.call(request, READ, self.core.get_job, job_id)
        return job, await asyncio.to_thread(self.core.follow_up, job)

    async def get_job(self, request: Request, job_id: str) -> dict:
        return oj.job_object(*await self._job(request, job_id))

    async def list_jobs(self, request: Request) -> dict:
        q = request.query_params
        limit = _limit(q.get("limit"), 100)
        after = q.get("after")
        token = ""
        if after:
            job = await self.call(request, READ, self.core.get_job, after)
            token = token_after(job.created_at.isoformat(), job.id)
        wanted = {k[9:-1]: v for k, v in q.items() if k.startswith("metadata[") and k.endswith("]")}
        data: list[dict] = []
        more = False
        while not more:  # until one job past the page is seen, or none is left
            page = await self.call(request, READ, self.core.list_jobs, "", limit + 1, token, self.project(request))
            for job in page.items:
                # An extraction a job submitted for itself is part of that job, not listed apart.
                if FOLLOWS_LABEL in job.spec.labels or any(job.spec.labels.get(k) != v for k, v in wanted.items()):
                    continue
                if len(data) == limit:
                    more = True
                    break
                data.append(oj.job_object(job, await asyncio.to_thread(self.core.follow_up, job)))
            token = page.next_token
            if not token:
                break
        return _list(data, more)

    async def cancel_job(self, request: Request, job_id: str) -> dict:
        job, follow = await self._job(request, job_id)
        if job.state == "succeeded" and follow is not None and not follow.terminal:
            follow = await self.call(request, SUBMIT, self.core.cancel, follow.id)
        elif job.state == "succeeded" and job.spec.then_extract is not None and follow is None:
            raise errors.FailedPrecondition(f"job {job_id} is submitting its extraction; cancel again in a moment")
        else:
            job = await self.call(request, SUBMIT, self.core.cancel, job_id)
        return oj.job_object(job, follow)

    async def events(self, request: Request, job_id: str) -> dict:
        """Newest first, `limit` at a time, `after` an event id: the job's events, then its extraction's."""
        q = request.query_params
        limit = _limit(q.get("limit"), 1000, default=20)
        job, follow = await self._job(request, job_id)
        sources = [(follow.id, "extraction: "), (job.id, "")] if follow is not None else [(job.id, "")]
        after_job, before = oj.parse_event_id(q["after"]) if q.get("after") else (sources[0][0], 0)
        if after_job not in [s for s, _ in sources]:
            raise oj.bad(f"after={q['after']!r} is not an event of job {job_id}", "after")
        data: list[dict] = []
        started = False
        for source, prefix in sources:
            if not started and source != after_job:
                continue
            started = True
            want = limit + 1 - len(data)
            events = await self.call(request, READ, self.core.job_events, source, before, want)
            data.extend(oj.event_object(source, e, prefix) for e in events)
            before = 0
            if len(data) > limit:
                break
        return _list(data[:limit], len(data) > limit)

    async def checkpoints(self, request: Request, job_id: str) -> dict:
        q = request.query_params
        limit = _limit(q.get("limit"), 1000, default=10)
        job, follow = await self._job(request, job_id)
        served = oj.job_object(job, follow)["fine_tuned_model"]
        events = await self.call(request, READ, self.core.job_events, job.id)
        found = oj.checkpoints(job, events, served)
        if q.get("after"):
            ids = [c["id"] for c in found]
            if q["after"] not in ids:
                raise oj.bad(f"after={q['after']!r} is not a checkpoint of job {job_id}", "after")
            found = found[ids.index(q["after"]) + 1 :]
        return _list(found[:limit], len(found) > limit)


def _limit(value: str | None, maximum: int, default: int = 20) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= maximum:
        raise HttpError(400, f"limit must be a whole number from 1 to {maximum}, got {value!r}", "limit")
    return int(value)


def _int(query, name: str, default: int) -> int:
    value = query.get(name)
    if value in (None, ""):
        return default
    if not value.isdigit():
        raise HttpError(400, f"{name} must be a whole number, got {value!r}", name)
    return int(value)


def _list(data: list[dict], more: bool) -> dict:
    return {
        "object": "list",
        "data": data,
        "has_more": more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


async def _json(request: Request) -> dict:
    import json

    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return body


async def _threaded(chunks: Iterator[bytes]):
    """A blocking iterator (blob reads) as an async one, a chunk per thread hop."""
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        yield chunk


def _route(path: str) -> str:
    """The path with its ids folded (bounded metric labels)."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["v1", "files"] and len(parts) > 2:
        return "/v1/files/{id}" + (f"/{parts[3]}" if len(parts) > 3 and parts[3] in ("content", "preview") else "")
    if parts[:3] == ["v1", "fine_tuning", "jobs"] and len(parts) > 3:
        return "/v1/fine_tuning/jobs/{id}" + (f"/{parts[4]}" if len(parts) > 4 else "")
    return path if path.startswith("/v1/") else "other"


def build_app(front: FineTuningFront) -> FastAPI:
    app = openai_app(
        "TuneDock OpenAI-compatible fine-tuning API", front.metrics, _route, "/v1/files and /v1/fine_tuning/jobs"
    )

    @app.post("/v1/files")
    async def upload(request: Request):
        return JSONResponse(await front.upload(request))

    @app.get("/v1/files")
    async def list_files(request: Request):
        return JSONResponse(await front.list_files(request))

    @app.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str):
        return JSONResponse(await front.get_file(request, file_id))

    @app.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str):
        return JSONResponse(await front.delete_file(request, file_id))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str):
        return await front.file_content(request, file_id)

    @app.get("/v1/files/{file_id}/preview")
    async def preview(request: Request, file_id: str):
        return JSONResponse(await front.preview(request, file_id))

    @app.get("/v1/fine_tuning/plan")
    async def plan(request: Request):
        return JSONResponse(await front.plan(request))

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        return JSONResponse(await front.create_job(request))

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request):
        return JSONResponse(await front.list_jobs(request))

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(request: Request, job_id: str):
        return JSONResponse(await front.get_job(request, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(request: Request, job_id: str):
        return JSONResponse(await front.cancel_job(request, job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def events(request: Request, job_id: str):
        return JSONResponse(await front.events(request, job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def checkpoints(request: Request, job_id: str):
        return JSONResponse(await front.checkpoints(request, job_id))

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    return app
