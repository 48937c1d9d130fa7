"""Signature reading and verification (issue 15) without I/O: the payload and manifest
of the registry are untrusted input; cryptography is imported only when keys are set."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.agent.signatures import (
    BadSignature,
    SignedPayload,
    read_claims,
    reference_repository,
    signature_layers,
    signature_tag,
)
from edge_agent.agent.trust import judge_signatures, load_trusted_keys
from edge_agent.protocol.errors import ConfigError
from tests.support import REPO_ROOT

REPO = "registry.example:5000/fleet/app"
DIGEST = "sha256:" + "a" * 64


def payload(identity: str = f"{REPO}:2.0", digest: str = DIGEST) -> bytes:
    return json.dumps({"critical": {"identity": {"docker-reference": identity},
                                    "image": {"docker-manifest-digest": digest},
                                    "type": "cosign container image signature"},
                       "optional": None}).encode()


def write_public(path: Path, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> Path:
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def ecdsa_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def test_verdicts(tmp_path: Path) -> None:
    trusted = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    edkey = ed25519.Ed25519PrivateKey.generate()
    trust = load_trusted_keys((write_public(tmp_path / "t.pub", trusted),
                               write_public(tmp_path / "e.pub", edkey)))

    def verdict(items: list[SignedPayload]) -> str | None:
        signer, problem = judge_signatures(items, trust, repository=REPO, digest=DIGEST)
        assert (signer is None) == (problem is not None)
        return problem

    good = payload()
    assert verdict([SignedPayload(good, ecdsa_sign(trusted, good))]) is None
    assert verdict([SignedPayload(good, edkey.sign(good))]) is None
    assert "no signature by a trusted key" in str(
        verdict([SignedPayload(good, ecdsa_sign(other, good))]))
    copied = payload(digest="sha256:" + "b" * 64)
    assert "for another image" in str(verdict([SignedPayload(copied, ecdsa_sign(trusted, copied))]))
    elsewhere = payload(identity="registry.example:5000/fleet/other:2.0")
    assert "another repository" in str(
        verdict([SignedPayload(elsewhere, ecdsa_sign(trusted, elsewhere))]))
    altered = good.replace(b"2.0", b"6.6")
    assert "no signature by a trusted key" in str(
        verdict([SignedPayload(altered, ecdsa_sign(trusted, good))]))
    # one good signature among bad ones is enough (rotation: several layers)
    assert verdict([SignedPayload(good, ecdsa_sign(other, good)),
                    SignedPayload(good, ecdsa_sign(trusted, good))]) is None


def test_key_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_trusted_keys((tmp_path / "missing.pub",))
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_trusted_keys((tmp_path / "junk.pub",))
    p384 = write_public(tmp_path / "p384.pub", ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ConfigError, match="P-256"):
        load_trusted_keys((p384,))


def test_names() -> None:
    assert signature_tag(DIGEST) == f"sha256-{'a' * 64}.sig"
    assert reference_repository(f"{REPO}:2.0") == REPO
    assert reference_repository(f"{REPO}@{DIGEST}") == REPO
    assert reference_repository("registry.example:5000/app") == "registry.example:5000/app"
    with pytest.raises(BadSignature):
        signature_tag("sha256:../../x")


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20))
def test_untrusted_manifests_and_payloads_never_crash(document: object) -> None:
    for call in (lambda: signature_layers(document if isinstance(document, dict)
                                          else {"layers": document}),
                 lambda: read_claims(json.dumps(document).encode()),
                 lambda: read_claims(json.dumps({"critical": document}).encode())):
        with contextlib.suppress(BadSignature):
            call()


def test_layers_read_the_cosign_annotation() -> None:
    signature = base64.b64encode(b"sig").decode()
    manifest = {"layers": [{"digest": DIGEST, "annotations": {
        "dev.cosignproject.cosign/signature": signature}}, {"digest": "junk"}]}
    [layer] = signature_layers(manifest)
    assert layer.payload_digest == DIGEST and layer.signature == b"sig"


def test_no_crypto_import_without_keys() -> None:
    """The agent's modules load without cryptography; a configured key loads it."""
    script = ("import sys\n"
              "import edge_agent.agent.cli, edge_agent.agent.runtime, edge_agent.agent.loop\n"
              "import edge_agent.agent.updater, edge_agent.agent.registry\n"
              "from edge_agent.agent.config import load_settings\n"
              "settings = load_settings({'CONTAINER_IMAGE': 'r/app:1', 'DATA_DIR': '/nonexistent'})\n"
              "assert not settings.trusted_keys\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('cryptography', 'nacl')))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO_ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout
