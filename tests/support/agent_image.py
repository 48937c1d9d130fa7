"""Agent images for the self-update tests: the repository's Dockerfile built once (offline,
as tests/test_dockerfile.py builds it), then small variants pushed to the local registry
under one repository, one tag per agent version. A variant sets EDGE_AGENT_VERSION (the
version the agent reports) and may replace the command:

- ``ok``: the agent as built;
- ``exits``: exits at once (code 3);
- ``no_broker``: the agent, but pointed at a port where no broker listens.
"""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from typing import Literal

import docker

from tests.support.base_image import base_image, build_context, daemon_arch, dependency_wheelhouse

Variant = Literal["ok", "exits", "no_broker"]
_COMMANDS: dict[Variant, str] = {
    "ok": "",
    "exits": 'ENTRYPOINT ["sh", "-c", "echo the new agent exits at once; exit 3"]\n',
    # MQTT_PORT from the container's environment would win over an ENV; the shell does not
    "no_broker": 'ENTRYPOINT ["sh", "-c", "MQTT_PORT=1 exec edge-agent"]\n',
}


def _consume(stream: object) -> str:
    output: list[str] = []
    image_id = None
    for chunk in stream:  # type: ignore[attr-defined]
        if "stream" in chunk:
            output.append(str(chunk["stream"]))
        if "error" in chunk:
            raise RuntimeError(f"docker build failed: {chunk['error']}\n"
                               + "".join(output)[-3000:])
        aux = chunk.get("aux")
        if isinstance(aux, dict) and "ID" in aux:
            image_id = str(aux["ID"])
    if image_id is None:
        raise RuntimeError("docker build gave no image id\n" + "".join(output)[-3000:])
    return image_id


def build_agent_image(client: docker.DockerClient) -> str:
    """The Dockerfile built from this checkout (offline); returns a local tag."""
    tag = f"edge-agent-selfupdate-test:{uuid.uuid4().hex[:8]}"
    wheelhouse = dependency_wheelhouse(daemon_arch(client))
    stream = client.api.build(
        fileobj=build_context(wheelhouse), custom_context=True, tag=tag, rm=True,
        forcerm=True, decode=True,
        buildargs={"BASE_IMAGE": base_image(client), "PIP_NO_INDEX": "1",
                   "PIP_FIND_LINKS": "/src/wheelhouse", "REVISION": "test"})
    _consume(stream)
    return tag


def push_variant(client: docker.DockerClient, base: str, repository: str, version: str,
                 variant: Variant = "ok") -> str:
    """``repository:version`` (repository names the registry) pushed; returns it."""
    dockerfile = (f"FROM {base}\nENV EDGE_AGENT_VERSION={json.dumps(version)}\n"
                  f"LABEL io.edge-agent.test.variant={variant}\n{_COMMANDS[variant]}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    reference = f"{repository}:{version}"
    _consume(client.api.build(fileobj=buf, custom_context=True, tag=reference, rm=True,
                              forcerm=True, decode=True))
    for line in client.api.push(repository, tag=version, stream=True, decode=True):
        if "error" in line:
            raise RuntimeError(f"push {reference}: {line['error']}")
    return reference
