"""Sigstore signing for tests, with Debian's skopeo as the signer and as an independent
verifier.

skopeo 1.9 signs (``--sign-by-sigstore-private-key``) but cannot make keys, so
``SigningKey.create`` writes the key pair in the formats skopeo (and cosign) read:

- the public key: a PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo), what TRUSTED_KEYS names;
- the private key: a PEM ``ENCRYPTED SIGSTORE PRIVATE KEY`` whose body is the JSON of
  go-securesystemslib's ``encrypted`` package: ``{"kdf": {"name": "scrypt", "params":
  {"N": 32768, "r": 8, "p": 1}, "salt": b64}, "cipher": {"name": "nacl/secretbox",
  "nonce": b64}, "ciphertext": b64}``: the PKCS#8 DER of the private key sealed with
  NaCl secretbox (XSalsa20-Poly1305) under the 32-byte scrypt key of the passphrase.

``sign`` writes what skopeo's ``copy --sign-by-sigstore-private-key`` with registries.d
``use-sigstore-attachments: true`` (and cosign) write: cosign's ``sha256-<hex>.sig`` tag.
Debian's skopeo 1.9.3 is built with sigstore disabled, for signing and verifying alike
("Debian-local change: sigstore disabled"): ``Skopeo.accepts`` asks skopeo's own policy
(``sigstoreSigned``) where a build has it, and raises SigstoreDisabled where not.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nacl.secret
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tests.support import DEFAULT_REGISTRY
from tests.support.registry import manifest_digest, repo_path

SCRYPT_N, SCRYPT_R, SCRYPT_P = 32768, 8, 1
PEM_TYPE = "ENCRYPTED SIGSTORE PRIVATE KEY"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"


def _pem(kind: str, body: bytes) -> bytes:
    lines = [base64.b64encode(body[i:i + 48]).decode() for i in range(0, len(body), 48)]
    return (f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----\n").encode()


def encrypt_private_key(pkcs8_der: bytes, passphrase: bytes) -> bytes:
    """The PEM skopeo's ``--sign-by-sigstore-private-key`` reads (see the module doc)."""
    salt = os.urandom(32)
    key = hashlib.scrypt(passphrase, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                         maxmem=64 << 20, dklen=32)
    nonce = os.urandom(nacl.secret.SecretBox.NONCE_SIZE)
    sealed = nacl.secret.SecretBox(key).encrypt(pkcs8_der, nonce).ciphertext

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    document = {
        "kdf": {"name": "scrypt", "params": {"N": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
                "salt": b64(salt)},
        "cipher": {"name": "nacl/secretbox", "nonce": b64(nonce)},
        "ciphertext": b64(sealed),
    }
    return _pem(PEM_TYPE, json.dumps(document).encode())


def decrypt_private_key(pem: bytes, passphrase: bytes,
                        ) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    """The inverse of ``encrypt_private_key``."""
    text = pem.decode()
    body = "".join(line for line in text.splitlines() if not line.startswith("-----"))
    assert text.startswith(f"-----BEGIN {PEM_TYPE}-----"), text[:60]
    document = json.loads(base64.b64decode(body))
    params = document["kdf"]["params"]
    key = hashlib.scrypt(passphrase, salt=base64.b64decode(document["kdf"]["salt"]),
                         n=params["N"], r=params["r"], p=params["p"], maxmem=64 << 20, dklen=32)
    der = nacl.secret.SecretBox(key).decrypt(base64.b64decode(document["ciphertext"]),
                                             base64.b64decode(document["cipher"]["nonce"]))
    private = serialization.load_der_private_key(der, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey)
    return private


@dataclass(frozen=True)
class SigningKey:
    """A key pair on disk: ``public`` (PEM), ``private`` (encrypted), ``passphrase_file``."""

    public: Path
    private: Path
    passphrase_file: Path

    @classmethod
    def create(cls, directory: Path, name: str, kind: str = "ecdsa") -> SigningKey:
        directory.mkdir(parents=True, exist_ok=True)
        private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        if kind == "ecdsa":
            private_key = ec.generate_private_key(ec.SECP256R1())
        else:
            private_key = ed25519.Ed25519PrivateKey.generate()
        passphrase = os.urandom(12).hex().encode()
        der = private_key.private_bytes(serialization.Encoding.DER,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        key = cls(directory / f"{name}.pub", directory / f"{name}.key",
                  directory / f"{name}.pass")
        key.public.write_bytes(private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        key.private.write_bytes(encrypt_private_key(der, passphrase))
        key.passphrase_file.write_bytes(passphrase)
        return key

    def load_private(self) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
        """The private key, decrypted from the file as skopeo would."""
        return decrypt_private_key(self.private.read_bytes(),
                                   self.passphrase_file.read_bytes())


class Skopeo:
    """skopeo with a registries.d that reads and writes sigstore attachments."""

    def __init__(self, directory: Path, registry: str = DEFAULT_REGISTRY) -> None:
        binary = shutil.which("skopeo")
        if binary is None:
            raise RuntimeError("skopeo is not installed: run scripts/stack")
        self.binary = binary
        self.registry = registry
        self.directory = directory
        self.registries_d = directory / "registries.d"
        self.registries_d.mkdir(parents=True, exist_ok=True)
        (self.registries_d / "sigstore.yaml").write_text(
            f"docker:\n  {registry}:\n    use-sigstore-attachments: true\n")
        self.accept_all = directory / "accept-all.json"
        self.accept_all.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, "--registries.d", str(self.registries_d), *args],
            capture_output=True, text=True, timeout=120, check=False)

    def accepts(self, repo: str, digest: str, keys: list[SigningKey]) -> bool:
        """Would skopeo's policy (``sigstoreSigned`` by one of ``keys``, matchRepository)
        let ``repo@digest`` be copied? skopeo 1.9 takes one key per requirement, and
        requirements all must hold: "one of the keys" is one policy per key."""
        return any(self._accepts_with(repo, digest, key) for key in keys)

    def _accepts_with(self, repo: str, digest: str, key: SigningKey) -> bool:
        policy = self.directory / "policy.json"
        policy.write_text(json.dumps({
            "default": [{"type": "reject"}],
            "transports": {"docker": {repo: [{
                "type": "sigstoreSigned", "keyPath": str(key.public),
                "signedIdentity": {"type": "matchRepository"}}]}},
        }))
        with tempfile.TemporaryDirectory(dir=self.directory) as target:
            done = self._run("copy", "--policy", str(policy), "--src-tls-verify=false",
                             f"docker://{repo}@{digest}", f"dir:{target}")
        if done.returncode == 0:
            return True
        if SIGSTORE_DISABLED in done.stderr:
            raise SigstoreDisabled(done.stderr.strip())
        if "Source image rejected" not in done.stderr:
            raise RuntimeError(f"skopeo copy --policy failed otherwise: {done.stderr.strip()}")
        return False


class SigstoreDisabled(RuntimeError):
    """This skopeo build cannot verify sigstore signatures (Debian's 1.9: "Debian-local
    change: sigstore disabled")."""


SIGSTORE_DISABLED = "sigstore disabled"


# ------------------------------------------------- forging signatures in the registry
def _request(method: str, url: str, data: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read(), dict(response.headers)


def signature_tag(digest: str) -> str:
    return f"sha256-{digest.removeprefix('sha256:')}.sig"


def get_signature_manifest(repo: str, digest: str) -> dict[str, object]:
    """The signature manifest skopeo wrote for ``repo@digest``."""
    url = f"http://{DEFAULT_REGISTRY}/v2/{repo_path(repo)}/manifests/{signature_tag(digest)}"
    _, body, _ = _request("GET", url, headers={"Accept": OCI_MANIFEST})
    document: dict[str, object] = json.loads(body)
    return document


def get_blob(repo: str, digest: str) -> bytes:
    _, body, _ = _request("GET", f"http://{DEFAULT_REGISTRY}/v2/{repo_path(repo)}/blobs/{digest}")
    return body


def put_blob(repo: str, data: bytes) -> str:
    """Upload ``data`` as a blob of ``repo`` (monolithic); returns its digest."""
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    base = f"http://{DEFAULT_REGISTRY}/v2/{repo_path(repo)}/blobs/uploads/"
    _, _, headers = _request("POST", base, data=b"")
    location = headers["Location"]
    if location.startswith("/"):
        location = f"http://{DEFAULT_REGISTRY}{location}"
    separator = "&" if "?" in location else "?"
    _request("PUT", f"{location}{separator}digest={digest}", data=data,
             headers={"Content-Type": "application/octet-stream"})
    return digest


def put_signature_manifest(repo: str, digest: str, manifest: dict[str, object],
                           blobs: dict[str, bytes]) -> None:
    """Store ``manifest`` as the signatures of ``repo@digest``, uploading ``blobs``."""
    for data in blobs.values():
        put_blob(repo, data)
    url = f"http://{DEFAULT_REGISTRY}/v2/{repo_path(repo)}/manifests/{signature_tag(digest)}"
    _request("PUT", url, data=json.dumps(manifest).encode(),
             headers={"Content-Type": OCI_MANIFEST})


def signature_payload(identity: str, digest: str) -> bytes:
    """A simple-signing payload as containers/image (skopeo) writes it."""
    return json.dumps({
        "critical": {"identity": {"docker-reference": identity},
                     "image": {"docker-manifest-digest": digest},
                     "type": "cosign container image signature"},
        "optional": {"creator": "edge-agent tests", "timestamp": int(time.time())},
    }).encode()


def sign(repo: str, tag: str, key: SigningKey, *, identity: str | None = None,
         digest: str | None = None) -> str:
    """Sign ``repo:tag`` (its registry digest, or ``digest``) with ``key`` for
    ``identity`` (default ``repo:tag``), as skopeo's ``--sign-by-sigstore-private-key``
    and cosign do; an existing signature manifest gets one more layer. Returns the digest.

    Debian's skopeo 1.9 refuses to sign ("Debian-local change: sigstore disabled") but
    verifies: the signature is made here, with the key skopeo would read, and skopeo's
    policy is the independent check that it is what skopeo and cosign write.
    """
    digest = digest or manifest_digest(repo, tag)
    assert digest is not None, f"{repo}:{tag} is not in the registry"
    payload = signature_payload(identity or f"{repo}:{tag}", digest)
    private = key.load_private()
    if isinstance(private, ec.EllipticCurvePrivateKey):
        signature = private.sign(payload, ec.ECDSA(hashes.SHA256()))
    else:
        signature = private.sign(payload)
    layers: list[dict[str, object]] = []
    blobs: dict[str, bytes] = {}
    try:
        existing = get_signature_manifest(repo, digest)
        old_layers = existing["layers"]
        assert isinstance(old_layers, list)
        layers = list(old_layers)
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
    payload_digest = f"sha256:{hashlib.sha256(payload).hexdigest()}"
    blobs[payload_digest] = payload
    layers.append({"mediaType": SIMPLE_SIGNING, "digest": payload_digest, "size": len(payload),
                   "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()}})
    config = json.dumps({"architecture": "", "os": "", "config": {}, "rootfs": {
        "type": "layers", "diff_ids": [layer["digest"] for layer in layers]}}).encode()
    config_digest = f"sha256:{hashlib.sha256(config).hexdigest()}"
    blobs[config_digest] = config
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_digest, "size": len(config)},
                "layers": layers}
    put_signature_manifest(repo, digest, manifest, blobs)
    return digest


def copy_signature(from_repo: str, from_digest: str, to_repo: str, to_digest: str,
                   *, corrupt: bool = False) -> None:
    """Put the signatures of ``from_repo@from_digest`` under ``to_repo@to_digest``
    (e.g. a valid signature of one image onto another). ``corrupt``: change one byte
    of each payload (still JSON; its blob digest then matches the altered bytes)."""
    manifest = get_signature_manifest(from_repo, from_digest)
    config = manifest["config"]
    layers = manifest["layers"]
    assert isinstance(config, dict) and isinstance(layers, list)
    blobs = {config["digest"]: get_blob(from_repo, config["digest"])}
    for layer in layers:
        data = get_blob(from_repo, layer["digest"])
        if corrupt:
            data = data.replace(b'"critical"', b'"critical" ', 1)
            layer["digest"] = f"sha256:{hashlib.sha256(data).hexdigest()}"
            layer["size"] = len(data)
        blobs[layer["digest"]] = data
    put_signature_manifest(to_repo, to_digest, manifest, blobs)
