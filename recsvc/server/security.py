"""TLS and bearer tokens: who may call, and over what.

- **TLS** (``[tls]``): a certificate and key make the server listen with TLS only; ``client_ca`` adds mutual
  TLS (every caller presents a certificate signed by that CA).
- **Tokens** (``[auth]``): callers send ``authorization: Bearer TOKEN``. A read token may call Recommend and
  GetExperimentReport; a write token may call everything (Feedback, UpsertItems, DeleteItems, ReloadRanker
  too). :class:`AuthInterceptor` checks every call of the Recommender service in one place: no or an unknown
  token is UNAUTHENTICATED, a known token without the method's scope is PERMISSION_DENIED (gRPC's meanings).
  Health and reflection stay open, so load balancers and grpcurl's discovery need no token.
- Tokens come from files (``file:PATH``, one per line) or environment variables (``env:NAME``), never from the
  command line or the config file itself; they are kept as SHA-256 digests, compared in constant time against
  every configured token (no early exit), and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

import grpc

from recsvc.config import AuthConfig, ClientConfig, ConfigError, TlsConfig

log = logging.getLogger("recsvc.server")

READ_METHODS = frozenset({"Recommend", "GetExperimentReport"})
WRITE_METHODS = frozenset({"Feedback", "UpsertItems", "DeleteItems", "ReloadRanker"})


def read_secrets(source: str) -> list[str]:
    """The tokens at ``file:PATH`` (one per line, blank lines and ``#`` comments skipped) or ``env:NAME``."""
    kind, _, where = source.partition(":")
    if kind == "file":
        path = Path(where).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"token file {path}: {exc.strerror or exc}") from None
        return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if kind == "env":
        value = os.environ.get(where, "").strip()
        return [value] if value else []
    raise ConfigError(f"token source {kind!r}: expected 'file:PATH' or 'env:VARIABLE'")


class TokenSet:
    """The read and write tokens, loaded from their sources (again on :meth:`reload`)."""

    def __init__(self, cfg: AuthConfig) -> None:
        self.cfg = cfg
        self.read: tuple[bytes, ...] = ()
        self.write: tuple[bytes, ...] = ()
        self.reload(cfg)

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.read_tokens or self.cfg.write_tokens)

    def reload(self, cfg: AuthConfig | None = None) -> None:
        cfg = cfg or self.cfg
        # kept as SHA-256 digests: every comparison is between 32-byte strings, so its time reveals
        # neither a token's bytes nor its length
        read = tuple(_digest(t.encode()) for s in cfg.read_tokens for t in read_secrets(s))
        write = tuple(_digest(t.encode()) for s in cfg.write_tokens for t in read_secrets(s))
        if (cfg.read_tokens or cfg.write_tokens) and not (read or write):
            raise ConfigError("auth: the token sources are configured but hold no token (empty files or unset "
                              "variables); every call would be refused")
        self.cfg, self.read, self.write = cfg, read, write

    def scope(self, token: bytes) -> str | None:
        """'write', 'read' or None; compares against every token in constant time (no early exit)."""
        token = _digest(token)
        is_write = is_read = False
        for t in self.write:
            is_write |= hmac.compare_digest(t, token)
        for t in self.read:
            is_read |= hmac.compare_digest(t, token)
        return "write" if is_write else "read" if is_read else None


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _bearer(metadata) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            value = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip().encode()
            return None
    return None


def _deny(code: grpc.StatusCode, details: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def refuse(request, context):
        context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=None,
                                               response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.ServerInterceptor):
    """The one place where tokens are checked (see the module docstring)."""

    def __init__(self, service: str, tokens: TokenSet) -> None:
        self._prefix = f"/{service}/"
        self.tokens = tokens

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not self.tokens.enabled or not method.startswith(self._prefix):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        name = method[len(self._prefix):]
        token = _bearer(handler_call_details.invocation_metadata)
        if token is None:
            return _deny(grpc.StatusCode.UNAUTHENTICATED,
                         "missing bearer token: send 'authorization: Bearer TOKEN' (recsvc's client verbs read "
                         "it from client.token, by default the RECSVC_TOKEN environment variable)", handler)
        scope = self.tokens.scope(token)
        if scope is None:
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid for this server", handler)
        if name in WRITE_METHODS and scope != "write":
            return _deny(grpc.StatusCode.PERMISSION_DENIED,
                         f"{name} needs a token of the write scope; this one may only read", handler)
        if name not in READ_METHODS and name not in WRITE_METHODS and scope != "write":
            return _deny(grpc.StatusCode.PERMISSION_DENIED, f"{name} needs a token of the write scope", handler)
        return handler


def server_credentials(cfg: TlsConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the server, or None (plaintext) when no certificate is configured."""
    if cfg.cert is None or cfg.key is None:
        return None
    try:
        cert = Path(cfg.cert).expanduser().read_bytes()
        key = Path(cfg.key).expanduser().read_bytes()
        ca = Path(cfg.client_ca).expanduser().read_bytes() if cfg.client_ca is not None else None
    except OSError as exc:
        raise ConfigError(f"tls: {exc.filename}: {exc.strerror or exc}") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def normalise_target(target: str, default_port: int = 50051) -> str:
    """``host`` -> ``host:50051`` (gRPC would otherwise pick 443); ``host:port`` and ``[v6]:port`` unchanged."""
    if "://" in target or target.startswith("unix:"):
        return target
    if target.startswith("["):
        return target if "]:" in target else f"{target}:{default_port}"
    if target.count(":") == 1:
        return target
    if target.count(":") > 1:  # a bare IPv6 address
        return f"[{target}]:{default_port}"
    return f"{target}:{default_port}"


def client_channel(cfg: ClientConfig, target: str | None = None) -> grpc.Channel:
    """A channel to ``target`` (default ``cfg.target``, else 127.0.0.1:50051) with the client's TLS and token
    settings."""
    target = normalise_target(target or cfg.target or "127.0.0.1:50051")
    tokens = read_secrets(cfg.token) if cfg.token else []
    use_tls = cfg.tls or cfg.tls_ca is not None or cfg.tls_cert is not None
    options = [("grpc.ssl_target_name_override", cfg.server_name)] if cfg.server_name else []
    if not use_tls:
        channel = grpc.insecure_channel(target, options=options)
        if tokens:
            # call credentials need a secure channel; over plaintext the token travels as metadata
            channel = grpc.intercept_channel(channel, _TokenMetadata(tokens[0]))
        return channel
    try:
        ca = Path(cfg.tls_ca).expanduser().read_bytes() if cfg.tls_ca else None
        cert = Path(cfg.tls_cert).expanduser().read_bytes() if cfg.tls_cert else None
        key = Path(cfg.tls_key).expanduser().read_bytes() if cfg.tls_key else None
    except OSError as exc:
        raise ConfigError(f"client tls: {exc.filename}: {exc.strerror or exc}") from None
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    if tokens:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(tokens[0]))
    return grpc.secure_channel(target, creds, options=options)


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._pair = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation, client_call_details, request):
        metadata = list(client_call_details.metadata or []) + [self._pair]
        details = client_call_details._replace(metadata=metadata) if hasattr(client_call_details, "_replace") \
            else _Details(client_call_details, metadata)
        return continuation(details, request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)
