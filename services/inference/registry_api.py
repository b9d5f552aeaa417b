"""The registry over HTTP, as the caller, for the web console: artifacts, versions with lineage, alias moves.

Not an OpenAI API (it has none for this), so it lives under /tunedock/v1. A thin gateway: each
request is one registry RPC made with the caller's own bearer token on a channel that carries no
token of its own, so the registry applies the caller's roles and projects (moving an alias needs
registry.admin) exactly as it does for `tunedock adapters alias`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.common.http import HttpError
from tunedock.v1 import adapter_registry_pb2 as pb
from tunedock.v1 import common_pb2


@dataclass
class RegistryFront:
    client: object
    """A RegistryClient whose channel sends no token (token=None): the caller's goes with each call."""
    timeout_s: float = 30.0

    def _metadata(self, request: Request) -> list[tuple[str, str]]:
        header = request.headers.get("authorization")
        return [("authorization", header)] if header else []

    async def _call(self, request: Request, method: str, message):
        rpc = getattr(self.client.stub, method)  # type: ignore[attr-defined]
        return await asyncio.to_thread(rpc, message, metadata=self._metadata(request), timeout=self.timeout_s)

    async def _all(self, request: Request, method: str, message, field: str) -> list:
        """Every item of a paged list RPC, following page tokens (as the SDK's pages(), with the caller's token)."""
        found: list = []
        while True:
            page = await self._call(request, method, message)
            found.extend(getattr(page, field))
            if not page.next_page_token:
                return found
            message.page_token = page.next_page_token

    async def artifacts(self, request: Request) -> dict:
        found = await self._all(request, "ListArtifacts", pb.ListArtifactsRequest(page_size=500), "artifacts")
        return {
            "data": [
                {
                    "name": a.name,
                    "kind": pb.ArtifactKind.Name(a.kind).removeprefix("ARTIFACT_KIND_").lower(),
                    "latest_version": a.latest_version,
                    "aliases": dict(a.aliases),
                    "base_model": a.base_model,
                    "project": a.project,
                }
                for a in found
            ]
        }

    async def versions(self, request: Request, name: str) -> dict:
        found = await self._all(request, "ListVersions", pb.ListVersionsRequest(name=name, page_size=500), "versions")
        return {"data": [version_object(v) for v in found]}

    async def set_alias(self, request: Request, name: str, alias: str) -> dict:
        try:
            body = await request.json()
            version = int(body["version"])
        except (ValueError, KeyError, TypeError):
            raise HttpError(400, 'send {"version": N}: the version the alias should point at', "version") from None
        answer = await self._call(request, "SetAlias", pb.SetAliasRequest(name=name, alias=alias, version=version))
        return {"name": name, "alias": alias, "version": version, "previous": answer.previous_version or None}


def version_object(v) -> dict:
    lineage = v.lineage
    return {
        "ref": f"{v.name}:{v.version}",
        "version": v.version,
        "kind": pb.ArtifactKind.Name(v.kind).removeprefix("ARTIFACT_KIND_").lower(),
        "aliases": list(v.aliases),
        "size": v.size,
        "created_at": int(v.create_time.seconds),
        "project": v.project,
        "lora_rank": v.lora_rank or None,
        "lineage": {
            "base_model": lineage.base_model,
            "job_id": lineage.job_id,
            "dataset_ids": list(lineage.dataset_ids),
            "method": common_pb2.Method.Name(lineage.method).removeprefix("METHOD_").lower() if lineage.method else "",
            "metrics": {m.name: m.value for m in lineage.metrics},
            "extracted_from": lineage.extracted_from,
        },
    }


def mount(app: FastAPI, front: RegistryFront) -> None:
    @app.get("/tunedock/v1/artifacts")
    async def artifacts(request: Request):
        return JSONResponse(await front.artifacts(request))

    @app.get("/tunedock/v1/artifacts/{name}/versions")
    async def versions(request: Request, name: str):
        return JSONResponse(await front.versions(request, name))

    @app.put("/tunedock/v1/artifacts/{name}/aliases/{alias}")
    async def set_alias(request: Request, name: str, alias: str):
        return JSONResponse(await front.set_alias(request, name, alias))
