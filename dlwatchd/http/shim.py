"""A tiny read-only HTTP server on the loopback interface, served from the supervisor process.

It answers from what the supervisor already knows (the last heartbeat, the query worker's last
device report) and from files and pure catalogue functions, so it never waits for a worker and
never loads torch. Only GET and HEAD; a Host header that is not a loopback name gets 403, which
defeats DNS-rebinding pages in a local browser.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.spool.layout import JOB_ID_RE, SpoolLayout

logger = logging.getLogger("dlwatchd.http")

PREFIX = "/api/v1"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass
class ShimSource:
    """Where the shim's answers come from; every callable must be cheap and thread-safe."""

    layout: SpoolLayout
    health: Callable[[], dict[str, Any] | None]
    device: Callable[[], dict[str, Any] | None]
    model_dirs: list[Path]
    weights_dir: Path


class _NotFound(Exception):
    pass


def host_is_loopback(header: str | None) -> bool:
    """True for a missing Host header or a loopback name, with or without a port."""
    if not header:
        return True
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in LOOPBACK_HOSTS


def route(source: ShimSource, path: str, query: dict[str, list[str]]) -> Any:
    """The JSON answer for a GET path below /api/v1; raises _NotFound or DlwatchdError."""
    from dlwatchd.catalog import architectures, encoders, freeze
    from dlwatchd.jobs.catalog import weights_available

    parts = [unquote(p) for p in path.split("/") if p]
    match parts:
        case ["health"]:
            return source.health() or {"state": "starting"}
        case ["gpu"]:
            info = source.device()
            if info is None:
                raise DlwatchdError(ErrorCode.NOT_FOUND, "The device has not been probed yet; try again in a moment.")
            return info
        case ["jobs", job_id] if JOB_ID_RE.match(job_id):
            try:
                return json.loads(source.layout.status_path(job_id).read_bytes())
            except (FileNotFoundError, ValueError):
                raise _NotFound() from None
        case ["models"]:
            from dlwatchd.artifacts.model_store import list_models

            return list_models(source.model_dirs).answer()
        case ["pretrained", "encoders"]:
            return [
                encoders.encoder_answer(e, weights_available(source.weights_dir, e.name))
                for e in encoders.list_encoders()
            ]
        case ["pretrained", "architectures"]:
            return [architectures.architecture_answer(a) for a in architectures.list_architectures()]
        case ["pretrained", "encoder", name]:
            entry = encoders.get_encoder(name)
            return encoders.encoder_answer(entry, weights_available(source.weights_dir, entry.name))
        case ["pretrained", "architecture", name]:
            return architectures.architecture_answer(architectures.resolve_architecture(name))
        case ["pretrained", "freeze-recommendations", size]:
            encoder = query.get("encoder")
            return freeze.freeze_recommendations(size, encoder[0] if encoder else None)
    raise _NotFound()


class _Handler(BaseHTTPRequestHandler):
    server_version = "dlwatchd"
    source: ShimSource  # set on the subclass made per server

    def _send(self, status: HTTPStatus, body: Any) -> None:
        data = json.dumps(body, allow_nan=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's naming)
        if not host_is_loopback(self.headers.get("Host")):
            self._send(HTTPStatus.FORBIDDEN, {"detail": "This server answers only requests addressed to localhost."})
            return
        url = urlsplit(self.path)
        if not url.path.startswith(PREFIX + "/"):
            self._send(HTTPStatus.NOT_FOUND, {"detail": "Not found."})
            return
        try:
            body = route(self.source, url.path[len(PREFIX) :], parse_qs(url.query))
        except _NotFound:
            self._send(HTTPStatus.NOT_FOUND, {"detail": "Not found."})
        except DlwatchdError as error:
            status = HTTPStatus.NOT_FOUND if error.code is ErrorCode.NOT_FOUND else HTTPStatus.BAD_REQUEST
            self._send(status, {"detail": error.message, "code": error.code.value})
        except Exception:
            logger.exception("HTTP shim failed on %s", url.path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"detail": "Internal error; see the daemon's log."})
        else:
            self._send(HTTPStatus.OK, body)

    do_HEAD = do_GET

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"detail": "This server is read-only: use GET."})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http %s", format % args)


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class HttpShim:
    """The shim's servers (127.0.0.1, and ::1 where the host has IPv6), each on its own thread."""

    def __init__(self, source: ShimSource, port: int) -> None:
        handler = type("Handler", (_Handler,), {"source": source})
        self.servers: list[ThreadingHTTPServer] = [ThreadingHTTPServer(("127.0.0.1", port), handler)]
        try:
            self.servers.append(_V6Server(("::1", port), handler))
        except OSError:
            logger.info("no IPv6 loopback; the HTTP shim listens on 127.0.0.1 only")
        for server in self.servers:
            server.daemon_threads = True
        self.port = port

    def start(self) -> None:
        for server in self.servers:
            threading.Thread(target=server.serve_forever, name="http-shim", daemon=True).start()
        logger.info("HTTP shim on http://127.0.0.1:%d%s (read-only)", self.port, PREFIX)

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def open_shim(source: ShimSource, port: int) -> tuple[HttpShim | None, str | None]:
    """Start the shim on `port`; (shim, None), or (None, why) when the port cannot be bound."""
    try:
        shim = HttpShim(source, port)
    except OSError as exc:
        problem = f"the HTTP shim cannot listen on 127.0.0.1:{port}: {exc.strerror}"
        logger.error(problem)
        return None, problem
    shim.start()
    return shim, None
