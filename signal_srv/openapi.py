"""The REST API's OpenAPI 3.1 document (``openapi.json``, kept in the package) and its handler.

The document describes the REST API as implemented; ``tests/test_openapi.py`` checks every
route and every documented status against the running server, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

from signal_srv.rest import JsonHandler

__all__ = ["OPENAPI_PATH", "OpenApiHandler", "load_document"]

OPENAPI_PATH = os.path.join(os.path.dirname(__file__), "openapi.json")


@lru_cache(maxsize=1)
def _document_bytes() -> bytes:
    with open(OPENAPI_PATH, "rb") as f:
        return f.read()


def load_document() -> dict[str, Any]:
    """The OpenAPI document as a fresh dict (callers may change their copy)."""
    return json.loads(_document_bytes())  # type: ignore[no-any-return]


class OpenApiHandler(JsonHandler):
    """``GET /apiv2/openapi.json``: the document, byte for byte, with an ETag (304 on a match).

    Accepts and ignores the keyword arguments the API handlers get (``registry``,
    ``config``, ...), so the route can share their ``deps`` dict or take none.
    """

    def initialize(self, **_: Any) -> None:
        pass

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Cache-Control", "no-cache")

    def get(self) -> None:
        self.finish(_document_bytes())
