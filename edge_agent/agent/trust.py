"""The fleet owner's public keys, and the check that a payload was signed by one of them.

Imported only when TRUSTED_KEYS is set: ``cryptography`` costs memory the agent does not
spend otherwise (docs/BENCHMARKS.md). ECDSA P-256 (what cosign and skopeo make: an ASN.1
DER signature over the payload's SHA-256) and Ed25519 (over the payload itself).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from edge_agent.agent.registry import locate
from edge_agent.agent.signatures import BadSignature, SignedPayload, check_claims, read_claims
from edge_agent.files import StorageError, read_regular_file
from edge_agent.protocol.errors import ConfigError

MAX_KEY_FILE_BYTES = 64 * 1024
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True)
class TrustedKey:
    path: str
    key: PublicKey
    # sha256 of the key's SubjectPublicKeyInfo, shown in logs and docs (first 16 hex)
    fingerprint: str


class TrustedKeys:
    """The keys of TRUSTED_KEYS; a payload is trusted when one of them signed it."""

    def __init__(self, keys: list[TrustedKey]) -> None:
        self.keys = keys
        # What a remembered verification was made under: another set of keys verifies anew.
        self.fingerprint = hashlib.sha256(
            " ".join(sorted(k.fingerprint for k in keys)).encode()).hexdigest()[:16]

    def signer_of(self, payload: bytes, signature: bytes) -> TrustedKey | None:
        """The trusted key that made ``signature`` over ``payload``, if any."""
        for trusted in self.keys:
            try:
                if isinstance(trusted.key, ed25519.Ed25519PublicKey):
                    trusted.key.verify(signature, payload)
                else:
                    trusted.key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                continue
            return trusted
        return None


def load_trusted_keys(paths: tuple[Path, ...]) -> TrustedKeys:
    """Read the PEM public keys; ConfigError naming the file for any that is not one."""
    keys = []
    for path in paths:
        try:
            data = read_regular_file(path, max_bytes=MAX_KEY_FILE_BYTES)
        except StorageError as exc:
            raise ConfigError(f"TRUSTED_KEYS: {exc}") from None
        if data is None:
            raise ConfigError(f"TRUSTED_KEYS: {path} does not exist")
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"TRUSTED_KEYS: {path} is not a PEM public key: "
                              f"{str(exc).splitlines()[0][:120] if str(exc) else exc}") from None
        if isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(key.curve, ec.SECP256R1):
                raise ConfigError(f"TRUSTED_KEYS: {path}: ECDSA keys must be P-256, "
                                  f"not {key.curve.name}")
        elif not isinstance(key, ed25519.Ed25519PublicKey):
            raise ConfigError(f"TRUSTED_KEYS: {path}: only ECDSA P-256 and Ed25519 keys "
                              f"are supported, not {type(key).__name__}")
        der = key.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
        keys.append(TrustedKey(str(path), key, hashlib.sha256(der).hexdigest()[:16]))
    if not keys:
        raise ConfigError("TRUSTED_KEYS: no key file named")
    return TrustedKeys(keys)


def judge_signatures(signed: list[SignedPayload], trust: TrustedKeys, *, repository: str,
                     digest: str) -> tuple[TrustedKey | None, str | None]:
    """The trusted key that signed ``digest`` for ``repository`` among ``signed``, or
    why none did (each distinct reason, in order)."""
    problems = []
    for item in signed:
        signer = trust.signer_of(item.payload, item.signature)
        if signer is None:
            problems.append("no signature by a trusted key (signed by another key, or its "
                            "payload was altered)")
            continue
        try:
            check_claims(read_claims(item.payload), repository=repository, digest=digest,
                         normalise=_repository_key)
        except BadSignature as exc:
            problems.append(f"signed by trusted key {signer.fingerprint}, but {exc}")
            continue
        return signer, None
    return None, "; ".join(dict.fromkeys(problems)) or "no signature payload could be read"


def _repository_key(repository: str) -> tuple[str, str] | str:
    """A repository as the registry knows it (Docker Hub short names expanded)."""
    try:
        location = locate(repository)
    except Exception:  # noqa: BLE001 - an unparsable signed name matches nothing but itself
        return repository
    return location.registry, location.name
