"""SSL contexts from the configuration: towards clients ([tls]) and towards servers ([backend])."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from .config import BackendConfig, TLSConfig
from .errors import ConfigError

ALPN = "postgresql"  # what PostgreSQL 17 clients ask for with direct TLS


def client_context(tls: TLSConfig, source: str) -> ssl.SSLContext | None:
    """The context for clients' TLS, or None when the proxy does not end it."""
    if tls.client_tls not in ("allow", "require"):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(source, "tls.cert_file", f"cannot load the certificate and key: {e}") from None
    if tls.ca_file:
        try:
            context.load_verify_locations(tls.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(source, "tls.ca_file", f"cannot load the CA: {e}") from None
        context.verify_mode = ssl.CERT_OPTIONAL  # checked when presented
    context.set_alpn_protocols([ALPN])
    return context


def leaf_certificate(tls: TLSConfig) -> bytes | None:
    """The DER of the certificate the proxy shows clients (the first in cert_file)."""
    if tls.client_tls not in ("allow", "require"):
        return None
    with open(tls.cert_file) as f:
        text = f.read()
    end = "-----END CERTIFICATE-----"
    return ssl.PEM_cert_to_DER_cert(text[:text.index(end) + len(end)])


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """How to talk TLS to the servers, as libpq's sslmode."""

    sslmode: str
    context: ssl.SSLContext
    check_hostname: bool

    @property
    def required(self) -> bool:
        return self.sslmode != "prefer"


def server_tls(backend: BackendConfig, source: str) -> ServerTLS | None:
    mode = backend.sslmode
    if mode == "disable":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # libpq: with sslmode=require, a root certificate given means verify-ca.
    verify = mode in ("verify-ca", "verify-full") or (mode == "require" and bool(backend.sslrootcert))
    context.check_hostname = mode == "verify-full"
    if verify:
        try:
            if backend.sslrootcert == "system":
                context.load_default_certs()
            else:
                context.load_verify_locations(backend.sslrootcert)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(source, "backend.sslrootcert", f"cannot load the CA: {e}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return ServerTLS(mode, context, context.check_hostname)
