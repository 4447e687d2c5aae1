"""The security headers every answer carries, and the demo page's Content Security Policy.

Every answer gets ``nosniff``, ``no-referrer`` (the demo page's URL holds a ``call_id``),
a policy that forbids framing, and no ``Server`` header (Tornado's names its version).
"""

from __future__ import annotations

from tornado.web import RequestHandler, StaticFileHandler

__all__ = ["API_POLICY", "DEMO_POLICY", "PERMISSIONS_POLICY", "DemoFileHandler", "add_security_headers"]

# Answers that are not documents: nothing may load from them or frame them.
API_POLICY = "default-src 'none'; frame-ancestors 'none'"
# The demo page: its own module script and stylesheet, its fetches and socket ('self'
# covers ws: and wss: of the same host) and the data: favicon. Media streams set through
# srcObject are not fetched, so they need no source.
DEMO_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
# The demo page asks for the camera and microphone, for itself only; nothing else.
PERMISSIONS_POLICY = "camera=(self), microphone=(self), display-capture=(), geolocation=(), payment=(), usb=()"


def add_security_headers(handler: RequestHandler, policy: str = API_POLICY) -> None:
    """Set the headers every answer carries; call it from ``set_default_headers``."""
    handler.clear_header("Server")
    handler.set_header("Content-Security-Policy", policy)
    handler.set_header("X-Content-Type-Options", "nosniff")
    handler.set_header("X-Frame-Options", "DENY")
    handler.set_header("Referrer-Policy", "no-referrer")
    handler.set_header("Permissions-Policy", PERMISSIONS_POLICY)


class DemoFileHandler(StaticFileHandler):
    """The demo page and its files, under the page's policy."""

    def set_default_headers(self) -> None:
        add_security_headers(self, DEMO_POLICY)
