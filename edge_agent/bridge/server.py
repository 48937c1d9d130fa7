"""http.server glue: ThreadingHTTPServer, bounded connections, JSON errors everywhere.

One thread per connection (``ThreadingHTTPServer``): a request waiting for a slow
device holds only its own thread, so it never blocks anyone else. The number of
connections is bounded; past the bound a client gets an immediate 503.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent.bridge.api import MAX_BODY_BYTES, Api, Request, Response, error_response
from edge_agent.bridge.fleet import Fleet
from edge_agent.bridge.link import MqttLink
from edge_agent.bridge.settings import BridgeSettings
from edge_agent.topics import Topics

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 512
SOCKET_TIMEOUT_S = 30.0
_BUSY_BODY = b'{"error":"too many connections; retry later"}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Retry-After: 1\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class BridgeHandler(BaseHTTPRequestHandler):
    """Reads one request, hands it to ``Api``, writes the answer."""

    server: BridgeServer
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "edge-bridge"
    timeout = SOCKET_TIMEOUT_S  # idle keep-alive and slow clients

    def version_string(self) -> str:
        return self.server_version

    def __getattr__(self, name: str) -> Any:
        """Every other method (QUERY, FOO, ...) reaches the API too: 405, not http.server's 501."""
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def _serve(self) -> None:
        body = self._read_body()
        if body is None:
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        request = Request(self.command, self.path, headers, body)
        try:
            response = self.server.api.handle(request)
        except Exception:
            log.exception("unhandled error for %s %s", self.command, self.path[:200])
            response = error_response(500, "internal error; see the bridge's log")
        self._send(response)

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering an unreadable one."""
        if "transfer-encoding" in (k.lower() for k in self.headers):
            self._refuse(411, "chunked bodies are not supported; send Content-Length")
            return None
        text = self.headers.get("Content-Length")
        if text is None:
            return b""
        try:
            length = int(text)
        except ValueError:
            length = -1
        if length < 0:
            self._refuse(400, "bad Content-Length")
            return None
        if length > MAX_BODY_BYTES:
            self._refuse(413, f"body larger than {MAX_BODY_BYTES} bytes")
            return None
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return None
        return body

    def _refuse(self, status: int, message: str) -> None:
        self.close_connection = True  # the unread body would poison the connection
        response = error_response(status, message)
        response.headers["Connection"] = "close"
        self._send(response)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too long, ...) as JSON."""
        self.close_connection = True
        body = json.dumps({"error": message or self.responses.get(code, ("error",))[0]}).encode()
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class BridgeServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on concurrent connections."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], api: Api, max_connections: int = MAX_CONNECTIONS
    ) -> None:
        self.api = api
        self._slots = threading.BoundedSemaphore(max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, BridgeHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class Bridge:
    """Fleet registry + MQTT link + HTTP server, started and stopped together."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.mqtt.topic_prefix)
        self.fleet = Fleet(self.topics)
        self.link = MqttLink(
            settings.mqtt,
            [self.topics.all_states, self.topics.all_availability, self.topics.all_events],
            self.fleet.handle,
        )
        self.api = Api(settings.token, self.topics, self.fleet, self.link,
                       max_wait_s=settings.max_wait_s)
        self.server = BridgeServer((settings.host, settings.port), self.api)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        port: int = self.server.server_address[1]
        return port

    @property
    def url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self.link.start()
        self._thread = threading.Thread(target=self.server.serve_forever, name="edge-bridge-http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        log.info("edge-bridge listening on %s", self.url)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.link.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
