"""The other replicas of this service, for the console's Serving page: found as the proxy finds them.

Replicas are the SRV records of their HTTP port (a Kubernetes headless Service publishes them; the
proxy's `server-template` reads the same name). Each is asked for its own `/tunedock/v1/serving`
with the caller's token, so every replica narrows what it shows to the caller's projects itself.
A replica that does not answer in time is listed with the reason, not dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

PEER_TIMEOUT_S = 2.0


async def resolve(srv_name: str, nameserver: str = "") -> list[tuple[str, int]]:
    """(host, port) of every SRV record of `srv_name`, sorted; `nameserver` as host:port overrides the system's."""
    import dns.asyncresolver

    resolver = dns.asyncresolver.Resolver(configure=not nameserver)
    if nameserver:
        host, _, port = nameserver.rpartition(":")
        resolver.nameservers, resolver.port = [host], int(port)
    answer = await resolver.resolve(srv_name, "SRV", lifetime=PEER_TIMEOUT_S)
    peers = []
    for record in answer:
        target = str(record.target).rstrip(".")
        # The targets through the same resolver (the system's may not know its names); else left as names.
        with contextlib.suppress(Exception):
            target = str((await resolver.resolve(target, "A", lifetime=PEER_TIMEOUT_S))[0])
        peers.append((target, int(record.port)))
    return sorted(peers)


async def ask_each(peers: list[tuple[str, int]], path: str, authorization: str, scheme: str = "http") -> list[dict]:
    """GET `path` of every peer with the caller's Authorization; each answer tagged with its address."""
    import httpx

    verify: str | bool = os.environ.get("TUNEDOCK_TLS_CA_FILE") or True

    async def one(client: httpx.AsyncClient, host: str, port: int) -> dict:
        address = f"{host}:{port}"
        try:
            answer = await client.get(f"{scheme}://{address}{path}", headers={"Authorization": authorization})
            body = answer.json()
            if answer.status_code != 200:
                return {"address": address, "error": body.get("error", {}).get("message", answer.reason_phrase)}
            return {"address": address, **body}
        except (httpx.HTTPError, ValueError) as exc:
            return {"address": address, "error": f"no answer: {type(exc).__name__} {exc}".strip()}

    async with httpx.AsyncClient(timeout=PEER_TIMEOUT_S, verify=verify) as client:
        return list(await asyncio.gather(*(one(client, host, port) for host, port in peers)))
