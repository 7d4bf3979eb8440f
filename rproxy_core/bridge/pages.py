"""Short answers the bridge gives visitors itself (DESIGN.md, "Status codes")."""

from __future__ import annotations

import html
import json
from http import HTTPStatus

from aiohttp import web

__all__ = ["error_response"]


def error_response(
    request: web.BaseRequest, status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """A plain, JSON or tiny HTML page by the visitor's ``Accept``; never a traceback."""
    reason = HTTPStatus(status).phrase
    accept = request.headers.get("Accept", "")
    extra = {"Cache-Control": "no-store", **(headers or {})}
    if "application/json" in accept and "text/html" not in accept:
        body = json.dumps({"error": message, "status": status})
        return web.Response(status=status, text=body, content_type="application/json", headers=extra)
    if "text/html" in accept:
        page = (
            "<!doctype html><meta charset=utf-8><meta name=viewport content='width=device-width'>"
            f"<title>{status} {reason}</title>"
            "<body style='font-family:system-ui,sans-serif;max-width:32em;margin:3em auto;padding:0 1em'>"
            f"<h1>{status} {html.escape(reason)}</h1><p>{html.escape(message)}</p>"
            "<p style='color:#777'>rproxy bridge</p>"
        )
        return web.Response(status=status, text=page, content_type="text/html", headers=extra)
    return web.Response(status=status, text=f"{status} {reason}: {message}\n", headers=extra)
