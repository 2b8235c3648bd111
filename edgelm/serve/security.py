"""The outermost layer: DNS-rebinding defence, CORS, the API key, and the catch-all.

Every request passes here before routing. On a loopback bind a Host header that does not name
the loopback is refused (a web page that rebinds its own domain to 127.0.0.1 still sends its
own name). CORS headers appear only for origins named by the operator. The key is a Bearer
token compared in constant time; /health and the chat page's files stay open (the page asks for
the key itself). Any exception that escapes an endpoint becomes a 500 in OpenAI's shape with a
one-line message; nothing internal reaches the client.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from edgelm.serve.errors import ApiError
from edgelm.serve.page import PAGE_PATHS

log = logging.getLogger("edgelm.serve")
OPEN_PATHS = ("/health", *PAGE_PATHS)  # the chat page loads without the key, then asks for it
CORS_METHODS = b"GET, POST, OPTIONS"
CORS_HEADERS = b"authorization, content-type"


def is_loopback_address(name: str) -> bool:
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def is_loopback_host(value: str) -> bool:
    """Whether a Host header names the loopback: localhost, 127.0.0.0/8 or ::1, with an optional port."""
    host = value.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return False
        name, rest = host[1:end], host[end + 1 :]
    else:
        name, _, port = host.partition(":")
        rest = f":{port}" if port or host.endswith(":") else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6):
        return False
    return name in ("localhost", "localhost.") or is_loopback_address(name)


def _header(scope, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in scope.get("headers", []) if k == name]


class Guard:
    """Wraps the ASGI app: refusals first, CORS on the way out, a JSON 500 for anything unexpected."""

    def __init__(self, app, *, api_key: str | None, cors_origins: tuple[str, ...], loopback_only: bool):
        self.app = app
        self.key = api_key.encode("utf-8") if api_key else None
        self.origins = {o.rstrip("/").lower() for o in cors_origins}
        self.loopback_only = loopback_only

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = self._allowed_origin(scope)
        started = False

        async def send_with_cors(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if origin:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"access-control-allow-origin", origin.encode("latin-1")),
                                                      (b"vary", b"Origin")]}
            await send(message)

        try:
            refusal = self._refusal(scope, origin)
            if refusal is not None:
                await refusal.send(send_with_cors)
            elif self._is_preflight(scope):
                await self._preflight(scope, send_with_cors)
            else:
                await self.app(scope, receive, send_with_cors)
        except OSError:  # the client has gone while we were answering it
            pass
        except Exception as err:
            log.error("internal error on %s %s: %s: %s", scope.get("method"), scope.get("path"),
                      type(err).__name__, err, exc_info=log.isEnabledFor(logging.DEBUG))
            if not started:
                try:
                    await ApiError(500, "internal server error; the server log has the details",
                                   code="internal_error").send(send_with_cors)
                except OSError:
                    pass

    def _allowed_origin(self, scope) -> str | None:
        origins = _header(scope, b"origin")
        if len(origins) != 1 or not self.origins:
            return None
        origin = origins[0].strip()
        if "*" in self.origins or origin.rstrip("/").lower() in self.origins:
            return origin
        return None

    def _refusal(self, scope, origin: str | None) -> ApiError | None:
        if self.loopback_only:
            hosts = _header(scope, b"host")
            if not hosts or not all(is_loopback_host(h) for h in hosts):
                return ApiError(403, "this server answers only requests addressed to localhost, 127.0.0.1 or [::1]",
                                code="host_not_allowed")
        if self._is_preflight(scope):
            if origin is None:
                return ApiError(403, "cross-origin requests are not allowed from this origin; the server operator "
                                "can allow it with --cors-origin", code="origin_not_allowed")
            return None
        if self.key is not None and scope.get("path") not in OPEN_PATHS and not self._key_matches(scope):
            return ApiError(401, "a missing or wrong API key; send it as 'Authorization: Bearer KEY'",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    def _key_matches(self, scope) -> bool:
        values = [v for k, v in scope.get("headers", []) if k == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    @staticmethod
    def _is_preflight(scope) -> bool:
        return scope.get("method") == "OPTIONS" and bool(_header(scope, b"access-control-request-method"))

    async def _preflight(self, scope, send) -> None:
        requested = _header(scope, b"access-control-request-headers")
        headers = [(b"access-control-allow-methods", CORS_METHODS),
                   (b"access-control-allow-headers", requested[0].encode("latin-1") if requested else CORS_HEADERS),
                   (b"access-control-max-age", b"600"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
