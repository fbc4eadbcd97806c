"""One try of one delivery: a signed POST to an address checked just before.

httpcore (under httpx) is used directly, for the control the SSRF guard needs
(``api/webhooks/addresses.py``): its network backend is replaced by one that connects to the
checked address whatever the URL's host says, so the name is resolved once; the request keeps the
URL's host in the Host header and the TLS SNI, and the certificate is verified against it. httpcore
never follows redirects (a 3xx is a failed try) and reads no proxy settings from the environment.
Every read, write and the TLS handshake are bounded by ``timeout_s``, and the whole try by a
deadline of three times that, so a receiver that answers one byte at a time cannot hold a
delivery past its lease.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpcore
from standardwebhooks.webhooks import Webhook as Signer

from api.webhooks.addresses import Target

USER_AGENT = "akl-distill-webhooks/1"
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class Outcome:
    status_code: int | None  # None: no answer (refused, timed out, TLS failure)
    error: str | None
    duration_ms: int

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def signed_headers(secret: str, message_id: str, body: bytes, now: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers: webhook-id, webhook-timestamp, webhook-signature (v1, HMAC-SHA256
    of ``id.timestamp.body`` with the ``whsec_`` secret)."""
    now = now or datetime.now(timezone.utc)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Signer(secret).sign(message_id, now, body),
    }


class _DeadlineStream(httpcore.NetworkStream):
    """A stream whose every operation ends by ``deadline`` (time.monotonic())."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner, self._deadline = inner, deadline

    def _left(self, timeout: float | None, error: type[Exception]) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise error("the try ran past its deadline")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        stream = self._inner.start_tls(
            ssl_context, server_hostname, self._left(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(stream, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects every TCP connection to ``address`` (the one the guard checked), never to a name."""

    def __init__(self, address: str, deadline: float) -> None:
        self._address, self._deadline = address, deadline
        self._system = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        left = self._deadline - time.monotonic()
        timeout = left if timeout is None else min(timeout, left)
        if timeout <= 0:
            raise httpcore.ConnectTimeout("the try ran past its deadline")
        stream = self._system.connect_tcp(
            self._address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        return _DeadlineStream(stream, self._deadline)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise httpcore.ConnectError("webhooks never use unix sockets")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def _host_header(target: Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.scheme == "https" else 80
    return host if target.port == default else f"{host}:{target.port}"


def send(target: Target, body: bytes, headers: dict[str, str], *, timeout_s: float) -> Outcome:
    """POST ``body`` to ``target``; the answer's status (its body is not read) or why none came."""
    start = time.monotonic()
    backend = _PinnedBackend(target.address, deadline=start + 3 * timeout_s)
    url = httpcore.URL(
        scheme=target.scheme.encode(),
        host=target.host.encode(),
        port=target.port,
        target=target.path.encode(),
    )
    request_headers = [
        ("Host", _host_header(target)),
        ("User-Agent", USER_AGENT),
        ("Content-Type", "application/json"),
        *headers.items(),
    ]
    timeouts = {"connect": min(5.0, timeout_s), "read": timeout_s, "write": timeout_s, "pool": timeout_s}
    status_code, error = None, None
    try:
        with httpcore.ConnectionPool(
            ssl_context=ssl.create_default_context(), network_backend=backend, max_connections=1, retries=0
        ) as pool:
            with pool.stream(
                "POST", url, headers=request_headers, content=body, extensions={"timeout": timeouts}
            ) as response:
                status_code = response.status
    except httpcore.TimeoutException as exc:
        error = f"timed out ({type(exc).__name__}: {exc})"
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, ssl.SSLError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    if status_code is not None and not 200 <= status_code < 300:
        error = f"answered {status_code}" + (
            " (redirects are not followed)" if 300 <= status_code < 400 else ""
        )
    return Outcome(
        status_code=status_code,
        error=None if error is None else error[:MAX_ERROR_CHARS],
        duration_ms=int((time.monotonic() - start) * 1000),
    )
