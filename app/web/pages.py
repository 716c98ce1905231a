"""Routes of the browser pages, their static files, and the headers that protect them."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).parent / "static"

# Only this origin's scripts and styles: a model answer that holds markup can never run, even
# if a bug let it reach innerHTML.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def try_and_rate() -> FileResponse:
    """Try the model and rate its answers."""
    return FileResponse(STATIC / "index.html")


@router.get("/dashboard")
def dashboard() -> FileResponse:
    """Quality of each version, the leaderboard, training runs."""
    return FileResponse(STATIC / "dashboard.html")


class SecurityHeaders:
    """Adds protective headers to every response, and a content policy to the pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # /docs is Swagger UI, which needs inline scripts; the policy covers our own pages.
        is_page = scope["path"] in ("/", "/dashboard") or scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                extra = dict(COMMON_HEADERS)
                if is_page:
                    extra["Content-Security-Policy"] = PAGE_POLICY
                for name, value in extra.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: FastAPI) -> None:
    """Serve the pages and their files, with the security headers on every response."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(SecurityHeaders)
