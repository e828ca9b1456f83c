"""SCRAM-SHA-256 for the admin console (RFC 5802, RFC 7677), sans-IO.

Verifiers have the form PostgreSQL stores in pg_authid:
    SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>   (base64)
so the proxy keeps no password, only what cannot be turned back into one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass

ITERATIONS = 4096  # PostgreSQL's scram_iterations default
MECHANISM = "SCRAM-SHA-256"


class AuthFailed(Exception):
    """The client's messages were malformed or its proof was wrong."""


def saslprep(password: str) -> bytes:
    """RFC 4013 SASLprep; like PostgreSQL, the raw UTF-8 when the password cannot be prepared."""
    raw = password.encode("utf-8")
    chars = [" " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)]
    prepared = unicodedata.normalize("NFKC", "".join(chars))
    prohibited = (stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22,
                  stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
                  stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
                  stringprep.in_table_c9)
    if not prepared or any(check(c) for c in prepared for check in prohibited):
        return raw
    if any(stringprep.in_table_d1(c) for c in prepared):
        if any(stringprep.in_table_d2(c) for c in prepared) or not (
                stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            return raw
    return prepared.encode("utf-8")


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True, slots=True)
class Verifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, text: str) -> Verifier:
        try:
            mechanism, rest = text.split("$", 1)
            params, keys = rest.split("$", 1)
            iterations, salt = params.split(":", 1)
            stored, server = keys.split(":", 1)
            if mechanism != MECHANISM:
                raise ValueError(mechanism)
            return cls(int(iterations), base64.b64decode(salt, validate=True),
                       base64.b64decode(stored, validate=True), base64.b64decode(server, validate=True))
        except ValueError:
            raise ValueError("not a SCRAM-SHA-256 verifier") from None

    @classmethod
    def make(cls, password: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> Verifier:
        salt = salt if salt is not None else secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(iterations, salt, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key"))

    @classmethod
    def mock(cls, user: str, secret: bytes, iterations: int = ITERATIONS) -> Verifier:
        """A verifier for a user that does not exist, with the same salt on every try
        (as a real user's), so that the exchange does not tell who exists."""
        digest = _hmac(secret, user.encode("utf-8", "surrogatepass"))
        return cls(iterations, digest[:16], _hmac(digest, b"stored"), _hmac(digest, b"server"))

    def __str__(self) -> str:
        return (f"{MECHANISM}${self.iterations}:{_b64(self.salt)}"
                f"${_b64(self.stored_key)}:{_b64(self.server_key)}")


def _utf8(message: bytes, what: str) -> str:
    try:
        return message.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthFailed(f"{what} is not UTF-8") from None


def _attributes(message: str) -> dict[str, str]:
    found = {}
    for part in message.split(","):
        name, sep, value = part.partition("=")
        if not sep or len(name) != 1:
            raise AuthFailed(f"malformed SCRAM attribute {part!r}")
        found[name] = value
    return found


class ScramServer:
    """One server side of an exchange: `first(client_first)`, then `final(client_final)`."""

    def __init__(self, verifier: Verifier, nonce: str | None = None) -> None:
        self.verifier = verifier
        self._nonce = nonce or _b64(secrets.token_bytes(18))
        self._client_first_bare = ""
        self._server_first = ""
        self._gs2 = ""
        self._combined_nonce = ""

    def first(self, client_first: bytes) -> bytes:
        text = _utf8(client_first, "client-first-message")
        gs2_flag, _, rest = text.partition(",")
        authzid, _, bare = rest.partition(",")
        if gs2_flag not in ("n", "y"):
            raise AuthFailed("channel binding is not offered here")
        if authzid:
            raise AuthFailed("authorization identities are not supported")
        self._gs2 = f"{gs2_flag},{authzid},"
        client_nonce = _attributes(bare).get("r")
        if not client_nonce:
            raise AuthFailed("client-first-message has no nonce")
        if not all("!" <= c <= "~" for c in client_nonce):  # RFC 5802: printable ASCII
            raise AuthFailed("client nonce is not printable ASCII")
        self._client_first_bare = bare
        self._combined_nonce = client_nonce + self._nonce
        v = self.verifier
        self._server_first = f"r={self._combined_nonce},s={_b64(v.salt)},i={v.iterations}"
        return self._server_first.encode("ascii")

    def final(self, client_final: bytes) -> bytes:
        text = _utf8(client_final, "client-final-message")
        without_proof, _, proof_part = text.rpartition(",p=")
        attrs = _attributes(without_proof)
        if attrs.get("c") != _b64(self._gs2.encode("ascii")) or attrs.get("r") != self._combined_nonce:
            raise AuthFailed("channel binding or nonce mismatch")
        try:
            proof = base64.b64decode(proof_part, validate=True)
        except ValueError:
            raise AuthFailed("malformed proof") from None
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = _hmac(self.verifier.stored_key, auth_message)
        if len(proof) != len(signature):
            raise AuthFailed("wrong proof length")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.verifier.stored_key):
            raise AuthFailed("wrong password")
        return f"v={_b64(_hmac(self.verifier.server_key, auth_message))}".encode("ascii")
