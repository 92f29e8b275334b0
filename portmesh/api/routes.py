"""The /v1 resources. Thin: parse HTTP, call :class:`Service`, shape the answer.

Every /v1 call, read or write, needs the bearer token, as Docker's and Kubernetes'
APIs do (a container's command, environment and logs are not for anyone who can
reach the port); ``/healthz`` and the OpenAPI document (app.py) stay open. Every
write answers with the generation it produced; with ``?wait=true`` it answers only once the switches
and agents of the hosts it concerns (and of every host that is up) have realised that generation and the
containers the write changed are reported live or failed (per object: a broken container elsewhere delays
nothing; per host: a host that is down and not concerned is named in ``lagging``, not waited for;
docs/components.md, "Waiting"), or 504 after ``timeout`` s.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from portmesh.api.config_schemas import ConfigOut, ConfigPatch, ConfigWriteOut, PoolIn, PoolOut, PoolWriteOut
from portmesh.api.logs import read_log
from portmesh.api.schemas import (
    IP_DOC,
    NAME_DOC,
    PROTO_DOC,
    BackendIn,
    ContainerIn,
    ContainerOut,
    ContainerWriteOut,
    ErrorBody,
    HostIn,
    HostOut,
    HostWriteOut,
    LagOut,
    LogsOut,
    MappingIn,
    MappingOut,
    MappingPatch,
    MappingWriteOut,
    StatusOut,
    WriteOut,
)
from portmesh.api.service import Service
from portmesh.api.settings import pool_view
from portmesh.model.entities import RunState
from portmesh.model.validation import MAX_STOP_TIMEOUT

_bearer = HTTPBearer(auto_error=False, description="The token from PORTMESH_TOKEN or the API's token file.")


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def require_token(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Refuse a call without the right bearer token (constant-time compare)."""
    expected: str = request.app.state.token
    if creds is None or not secrets.compare_digest(creds.credentials.encode(), expected.encode()):
        raise HTTPException(
            status_code=401,
            detail={"field": "authorization", "reason": "a valid 'Authorization: Bearer <token>' header is required"},
            headers={"WWW-Authenticate": "Bearer"},
        )


Svc = Annotated[Service, Depends(get_service)]
# Path parameters documented as the model's parsers read them (they still judge, naming the field).
Name = Annotated[str, Path(json_schema_extra=NAME_DOC)]
PublicIp = Annotated[str, Path(json_schema_extra=IP_DOC)]
ProtoPath = Annotated[str, Path(json_schema_extra={"pattern": PROTO_DOC["pattern"]})]
PortPath = Annotated[int, Path(ge=1, le=65535)]
Wait = Annotated[
    bool,
    Query(description="Answer only once the change is live on the hosts it concerns and on every host that is up."),
]
StopTime = Annotated[
    int | None,
    Query(
        ge=0,
        le=MAX_STOP_TIMEOUT,
        description="Seconds from SIGTERM to SIGKILL (docker stop --time); default: the container's stop_timeout.",
    ),
]
Timeout = Annotated[float | None, Query(gt=0, le=3600, description="Seconds to wait before answering 504.")]

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "The body is not JSON",
        401: "Missing or wrong token",
        404: "A named thing does not exist",
        409: "Clashes with the current state",
        422: "Malformed input",
        504: "Written, but not live everywhere within the timeout",
    }.items()
}

router = APIRouter(prefix="/v1", responses=ERRORS, dependencies=[Depends(require_token)])


async def _converged(
    service: Service,
    generation: int,
    wait: bool,
    timeout: float | None,
    containers: Sequence[str] = (),
    hosts: Sequence[str | None] = (),
    exempt: Sequence[str] = (),
) -> tuple[bool, list[LagOut]]:
    """Per object: the switches and agents waited for at ``generation`` and the named ``containers``
    realised (progress.compute_status), never the whole host, so one broken container delays no other
    write; per host: those the write concerns (the containers' and ``hosts``, the gateways) and every
    other host that is up, never ``exempt``. The second value names the hosts down and not waited for."""
    anchors = [h for h in hosts if h is not None]
    if wait:
        status = await service.wait_converged(generation, timeout, containers, anchors, exempt)
        return True, status.lagging
    status = await service.status(generation, containers, anchors, exempt)
    return status.converged, status.lagging


# --- hosts ---


@router.get("/hosts", tags=["hosts"])
async def list_hosts(service: Svc) -> list[HostOut]:
    return await service.hosts()


@router.get("/hosts/{name}", tags=["hosts"])
async def get_host(name: Name, service: Svc) -> HostOut:
    return await service.host(name)


@router.post("/hosts", status_code=201, tags=["hosts"])
async def add_host(body: HostIn, service: Svc, wait: Wait = False, timeout: Timeout = None) -> HostWriteOut:
    """Register a host; the others' agents add a tunnel to it. The new host, gateway or not, is waited
    for only if it is up: its agent may start after this (it reads its underlay address from here)."""
    generation, host = await service.add_host(body)
    done, lagging = await _converged(service, generation, wait, timeout, exempt=[host.name])
    return HostWriteOut(generation=generation, converged=done, lagging=lagging, host=HostOut.of(host))


@router.delete("/hosts/{name}", tags=["hosts"])
async def remove_host(name: Name, service: Svc, wait: Wait = False, timeout: Timeout = None) -> WriteOut:
    """Forget a host (409 while containers are placed on it); the others' agents remove their tunnel to it."""
    generation = await service.remove_host(name)
    done, lagging = await _converged(service, generation, wait, timeout)
    return WriteOut(generation=generation, converged=done, lagging=lagging)


# --- configuration and public pools ---


@router.get("/config", tags=["config"])
async def get_config(service: Svc) -> ConfigOut:
    """The cloud's network configuration, as every component reads it from the store."""
    return ConfigOut.of((await service.snapshot()).config)


@router.patch("/config", tags=["config"])
async def patch_config(body: ConfigPatch, service: Svc, wait: Wait = False, timeout: Timeout = None) -> ConfigWriteOut:
    """Change some fields. 409 naming the field while containers exist (they are plumbed with the
    old values); unchanged values are no change. Public pools: ``/v1/pools``."""
    generation, config = await service.set_config(body)
    done, lagging = await _converged(service, generation, wait, timeout)
    return ConfigWriteOut(generation=generation, converged=done, lagging=lagging, config=ConfigOut.of(config))


@router.get("/pools", tags=["config"])
async def list_pools(service: Svc) -> list[PoolOut]:
    state = await service.snapshot()
    return [pool_view(state, pool) for pool in state.config.public_pools]


@router.post("/pools", status_code=201, tags=["config"])
async def add_pool(body: PoolIn, service: Svc, wait: Wait = False, timeout: Timeout = None) -> PoolWriteOut:
    """Add a public pool: 422 not an IPv4 network without host bits, 409 overlapping another pool."""
    generation, pool = await service.add_pool(body.pool)
    done, lagging = await _converged(service, generation, wait, timeout)
    view = pool_view(await service.snapshot(), pool)
    return PoolWriteOut(generation=generation, converged=done, lagging=lagging, pool=view)


@router.delete("/pools/{address}/{prefix}", tags=["config"])
async def remove_pool(
    address: PublicIp,
    prefix: Annotated[int, Path(ge=0, le=32)],
    service: Svc,
    wait: Wait = False,
    timeout: Timeout = None,
) -> WriteOut:
    """Remove the pool ``address/prefix``: 404 if it is none, 409 while a container holds an IP of it."""
    generation, _ = await service.remove_pool(address, prefix)
    done, lagging = await _converged(service, generation, wait, timeout)
    return WriteOut(generation=generation, converged=done, lagging=lagging)


# --- containers ---


@router.get("/containers", tags=["containers"])
async def list_containers(service: Svc) -> list[ContainerOut]:
    return await service.containers()


@router.get("/containers/{name}", tags=["containers"])
async def get_container(name: Name, service: Svc) -> ContainerOut:
    return await service.container(name)


@router.get("/containers/{name}/logs", tags=["containers"])
async def container_logs(
    name: Name,
    service: Svc,
    request: Request,
    offset: Annotated[int, Query(ge=0, description="Byte offset to read from (the last answer's offset).")] = 0,
    tail: Annotated[int | None, Query(ge=0, le=100000, description="Only the last N lines.")] = None,
) -> LogsOut:
    """The container's output as its host's runtime wrote it (same machine as the API: embedded deployment).

    ``running`` says whether the container still runs, so ``logs -f`` knows when to stop following.
    Only ``*.log`` files under a runtime's log directory are read, whatever the store says (logs.py).
    """
    container = await service.container(name)
    status = container.status
    log_dirs: tuple[str, ...] = request.app.state.log_dirs
    chunk = await asyncio.to_thread(read_log, name, status.log_path if status else "", offset, tail, log_dirs)
    running = status is not None and status.state == RunState.RUNNING.value
    return LogsOut(name=name, path=chunk.path, offset=chunk.offset, text=chunk.text, running=running)


@router.post("/containers", status_code=201, tags=["containers"])
async def add_container(body: ContainerIn, service: Svc, wait: Wait = False, timeout: Timeout = None) -> ContainerWriteOut:
    """Create a container and its mappings (every IP x every port) in one store transaction.

    With ``wait``, a container whose first start fails is removed again and refused (404 ``image``
    / 422 ``command``): a failed create changes nothing. ``notes`` says what the API chose.
    """
    generation, container, progress = await service.create_container(body, wait, timeout)
    notes = [f"name {container.name!r} generated"] if body.name is None else []
    if body.host is None:
        notes.append(f"host {container.host!r} chosen: fewest containers, ties by name")
    view = await service.container(container.name)
    return ContainerWriteOut(
        generation=generation, converged=progress.converged, lagging=progress.lagging, container=view, notes=notes
    )


@router.delete("/containers/{name}", tags=["containers"])
async def remove_container(name: Name, service: Svc, wait: Wait = False, timeout: Timeout = None) -> WriteOut:
    """Remove a container and, in the same transaction, its mappings."""
    generation, host = await service.remove_container(name)
    done, lagging = await _converged(service, generation, wait, timeout, hosts=[host])
    return WriteOut(generation=generation, converged=done, lagging=lagging)


@router.post("/containers/{name}/stop", tags=["containers"])
async def stop_container(
    name: Name, service: Svc, wait: Wait = False, timeout: Timeout = None, time: StopTime = None
) -> ContainerWriteOut:
    generation = await service.set_running(name, False, time)
    done, lagging = await _converged(service, generation, wait, timeout, [name])
    view = await service.container(name)
    return ContainerWriteOut(generation=generation, converged=done, lagging=lagging, container=view)


@router.post("/containers/{name}/start", tags=["containers"])
async def start_container(name: Name, service: Svc, wait: Wait = False, timeout: Timeout = None) -> ContainerWriteOut:
    """Answers with the container as its agent reports it: a start that failed shows in error, with the reason."""
    generation = await service.set_running(name, True)
    done, lagging = await _converged(service, generation, wait, timeout, [name])
    view = await service.container(name)
    return ContainerWriteOut(generation=generation, converged=done, lagging=lagging, container=view)


# --- mappings ---


MAPPING = "/mappings/{public_ip}/{proto}/{port}"


@router.get("/mappings", tags=["mappings"])
async def list_mappings(service: Svc) -> list[MappingOut]:
    """Every mapping with its backends (weight, health), policy and health check; counters: read one mapping."""
    return await service.mappings()


@router.get(MAPPING, tags=["mappings"])
async def get_mapping(public_ip: PublicIp, proto: ProtoPath, port: PortPath, service: Svc) -> MappingOut:
    """One mapping, with its backends' health as their agents report it and its counters (allowed and
    denied packets and bytes over every switch, as the master controller last read them)."""
    return await service.mapping(public_ip, proto, port)


@router.post("/mappings", status_code=201, tags=["mappings"])
async def add_mapping(
    body: MappingIn, service: Svc, response: Response, wait: Wait = False, timeout: Timeout = None
) -> MappingWriteOut:
    """201 with the new mapping; 200 with the existing one if this very mapping exists (idempotent).
    Several ``backends`` share its new connections by ``weights``; ``allow``/``deny`` filter sources."""
    generation, mapping, created = await service.add_mapping(body)
    if not created:
        response.status_code = 200
    done, lagging = await _converged(service, generation, wait, timeout, mapping.names)
    return MappingWriteOut(generation=generation, converged=done, lagging=lagging, mapping=await service.view(mapping))


@router.patch(MAPPING, tags=["mappings"])
async def patch_mapping(
    public_ip: PublicIp,
    proto: ProtoPath,
    port: PortPath,
    body: MappingPatch,
    service: Svc,
    wait: Wait = False,
    timeout: Timeout = None,
) -> MappingWriteOut:
    """Change the policy (allow, deny), health check or weights in one store transaction; with ``wait``
    it answers once the change is live on every switch that is up (atomic per switch)."""
    generation, mapping = await service.patch_mapping(public_ip, proto, port, body)
    done, lagging = await _converged(service, generation, wait, timeout, mapping.names)
    return MappingWriteOut(generation=generation, converged=done, lagging=lagging, mapping=await service.view(mapping))


@router.post(MAPPING + "/backends", status_code=201, tags=["mappings"])
async def add_backend(
    public_ip: PublicIp,
    proto: ProtoPath,
    port: PortPath,
    body: BackendIn,
    service: Svc,
    wait: Wait = False,
    timeout: Timeout = None,
) -> MappingWriteOut:
    """Add a backend: it takes a share of new connections; connections on the others stay where they are."""
    generation, mapping = await service.add_backend(public_ip, proto, port, body)
    done, lagging = await _converged(service, generation, wait, timeout, mapping.names)
    return MappingWriteOut(generation=generation, converged=done, lagging=lagging, mapping=await service.view(mapping))


@router.delete(MAPPING + "/backends/{container}", tags=["mappings"])
async def remove_backend(
    public_ip: PublicIp,
    proto: ProtoPath,
    port: PortPath,
    container: Name,
    service: Svc,
    wait: Wait = False,
    timeout: Timeout = None,
) -> MappingWriteOut:
    """Remove a backend (409 for the last one: remove the mapping). It gets no new connections."""
    generation, mapping, host = await service.remove_backend(public_ip, proto, port, container)
    done, lagging = await _converged(service, generation, wait, timeout, mapping.names, hosts=[host])
    return MappingWriteOut(generation=generation, converged=done, lagging=lagging, mapping=await service.view(mapping))


@router.delete(MAPPING, tags=["mappings"])
async def remove_mapping(
    public_ip: PublicIp, proto: ProtoPath, port: PortPath, service: Svc, wait: Wait = False, timeout: Timeout = None
) -> WriteOut:
    generation, hosts = await service.remove_mapping(public_ip, proto, port)
    done, lagging = await _converged(service, generation, wait, timeout, hosts=hosts)
    return WriteOut(generation=generation, converged=done, lagging=lagging)


# --- convergence ---


@router.get("/status", tags=["status"])
async def status(service: Svc) -> StatusOut:
    """The store's generation and, per host, the generation its switch and agent have realised."""
    return await service.status()
