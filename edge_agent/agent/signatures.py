"""Sigstore signatures as the registry holds them, read without any crypto (pure).

A signed image ``repo@sha256:<hex>`` has its signatures in the same repository under the
tag ``sha256-<hex>.sig`` (cosign's convention; skopeo writes the same with registries.d
``use-sigstore-attachments: true``): an OCI image manifest whose layers are "simple
signing" payloads, each layer's annotation ``dev.cosignproject.cosign/signature`` holding
the base64 signature of that payload. The payload is JSON; what it vouches for is under
``critical``: ``identity.docker-reference`` (where the signer pushed the image) and
``image.docker-manifest-digest`` (the manifest digest). docs/SIGNING.md has the details.

Cryptographic verification is in ``agent/trust.py``, imported only when keys are set.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from edge_agent.protocol import safejson

SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIMPLE_SIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_TYPE = "cosign container image signature"
# One payload is a few hundred bytes; a signature manifest holds one layer per signature.
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_SIGNATURES = 32
MAX_SIGNATURE_BYTES = 1024
DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")


class BadSignature(ValueError):
    """A signature (or its manifest or payload) that proves nothing: the reason why."""


@dataclass(frozen=True)
class SignatureLayer:
    """One signature as the manifest lists it: the payload blob and the signature."""

    payload_digest: str
    signature: bytes


@dataclass(frozen=True)
class SignedPayload:
    """A payload as fetched from the registry, with the signature over it."""

    payload: bytes
    signature: bytes


def signature_tag(digest: str) -> str:
    """The tag that holds the signatures of the manifest ``digest``."""
    match = DIGEST_RE.fullmatch(digest)
    if match is None:
        raise BadSignature(f"not a sha256 digest: {digest[:80]!r}")
    return f"sha256-{match.group(1)}.sig"


def signature_layers(manifest: dict[str, Any]) -> list[SignatureLayer]:
    """The signatures a signature manifest lists (layers without one are skipped)."""
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise BadSignature("the signature manifest has no layers")
    found = []
    for layer in layers[:MAX_SIGNATURES]:
        if not isinstance(layer, dict):
            continue
        annotations = layer.get("annotations")
        digest = layer.get("digest")
        if not isinstance(annotations, dict) or not isinstance(digest, str):
            continue
        encoded = annotations.get(SIGNATURE_ANNOTATION)
        if not isinstance(encoded, str) or DIGEST_RE.fullmatch(digest) is None:
            continue
        if len(encoded) > 2 * MAX_SIGNATURE_BYTES:
            continue
        try:
            signature = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        found.append(SignatureLayer(digest, signature))
    if not found:
        raise BadSignature("the signature manifest holds no signature")
    return found


@dataclass(frozen=True)
class Claims:
    """What a simple-signing payload vouches for."""

    docker_reference: str
    manifest_digest: str


def read_claims(payload: bytes) -> Claims:
    """The critical claims of a payload; BadSignature when it is not one."""
    try:
        document = safejson.loads_object(payload, max_bytes=MAX_PAYLOAD_BYTES)
    except safejson.UntrustedJson as exc:
        raise BadSignature(f"the signed payload is not JSON: {exc}") from None
    critical = document.get("critical")
    if not isinstance(critical, dict):
        raise BadSignature("the signed payload has no critical section")
    identity = critical.get("identity")
    image = critical.get("image")
    kind = critical.get("type")
    reference = identity.get("docker-reference") if isinstance(identity, dict) else None
    digest = image.get("docker-manifest-digest") if isinstance(image, dict) else None
    if kind != SIGNATURE_TYPE:
        raise BadSignature(f"the signed payload is of type {str(kind)[:80]!r}, not "
                           f"{SIGNATURE_TYPE!r}")
    if not isinstance(reference, str) or not isinstance(digest, str):
        raise BadSignature("the signed payload names no docker-reference or manifest digest")
    return Claims(reference, digest)


def reference_repository(reference: str) -> str:
    """``host/path`` of a reference, without its tag or digest."""
    name = reference.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]
    return name


def check_claims(claims: Claims, *, repository: str, digest: str,
                 normalise: Any = None) -> None:
    """The claims of a verified payload must name exactly ``digest`` in ``repository``
    (``normalise`` maps a repository to a comparable form, e.g. Docker Hub short names)."""
    if claims.manifest_digest != digest:
        raise BadSignature(f"the signature is for another image ({claims.manifest_digest[:80]})")
    signed = reference_repository(claims.docker_reference)
    same = (normalise(signed) == normalise(repository) if normalise is not None
            else signed == repository)
    if not same:
        raise BadSignature(f"the signature names another repository ({signed[:120]})")
