"""Helpers for tests of failed updates: what Docker holds and did, and real faults.

- ``container_names``: the containers whose names start with a prefix (``<name>``,
  ``<name>-next``, ``<name>-previous``).
- ``DockerMark`` / ``created_since``: the containers the daemon created after a moment,
  from its own event log (proof that a check did not try again).
- ``TakenPort``: a TCP port held by a listening socket, so Docker cannot publish it.
- ``ask``: hand an in-process agent a live device tag with a request id, as the bridge or
  edge-ctl publishes it.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import docker

from edge_agent.agent.loop import Agent
from edge_agent.protocol.messages import RemoteTagMessage
from edge_agent.protocol.state import Source


def container_names(client: docker.DockerClient, prefix: str) -> list[str]:
    return sorted(c.name for c in client.containers.list(all=True, filters={"name": prefix})
                  if c.name and c.name.startswith(prefix))


@dataclass(frozen=True)
class DockerMark:
    """A moment on the daemon's clock (the same host: the wall clock)."""

    at: float = field(default_factory=time.time)


def created_since(client: docker.DockerClient, prefix: str, mark: DockerMark) -> list[str]:
    """Names of the containers starting with ``prefix`` created since ``mark``."""
    time.sleep(0.05)  # events are stamped as they happen; let the last one land
    until = time.time()
    names = []
    # the stub allows int | datetime only (docker-py makes a datetime whole seconds);
    # docker-py passes a string through and the daemon takes fractional seconds
    stream = client.events(  # type: ignore[call-overload]
        since=f"{mark.at:.6f}", until=f"{until:.6f}", decode=True,
        filters={"type": "container", "event": "create"})
    try:
        for event in stream:
            name = str(event.get("Actor", {}).get("Attributes", {}).get("name", ""))
            if name.startswith(prefix):
                names.append(name)
    finally:
        stream.close()
    return names


class TakenPort:
    """A port on 127.0.0.1 held by a listening socket: Docker's attempt to publish it on
    0.0.0.0 fails with "address already in use" when the container starts."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port: int = self.sock.getsockname()[1]

    def release(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def ask(agent: Agent, tag: str, request_id: str) -> None:
    """A live device tag over MQTT with a request id, straight into the agent's handler."""
    payload = json.dumps({"tag": tag, "request_id": request_id}).encode()
    agent.handle(RemoteTagMessage(Source.DEVICE, payload, topic="test", retained=False))
