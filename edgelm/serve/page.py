"""The chat page at `/`: a few files shipped inside the package, served by the same app.

The files are a fixed table of names: the name in a /static/NAME request is looked up in it and
never joined to a folder, so no path a client sends can reach another file. Every answer carries a
Content-Security-Policy that allows scripts, styles and requests from this origin only and no
inline code, so text a model writes cannot run as script even if the page's own renderer slipped.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgelm.serve.errors import ApiError, quoted

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Cache-Control": "no-cache",  # revalidate, so an upgraded edgelm serves its own page
}
HTML = "text/html; charset=utf-8"
JAVASCRIPT = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"
SVG = "image/svg+xml"

# The only files the page can serve: the page itself at "/", and these under /static/.
INDEX = "index.html"
STATIC_FILES = {
    "app.js": JAVASCRIPT,
    "api.js": JAVASCRIPT,
    "markdown.js": JAVASCRIPT,
    "store.js": JAVASCRIPT,
    "style.css": CSS,
    "icon.svg": SVG,
}
# Open without the API key: the page must load before it can ask for the key. Only /v1 needs it.
PAGE_PATHS = ("/", *(f"/static/{name}" for name in STATIC_FILES))


@cache
def packaged(name: str) -> bytes:
    """A file of edgelm/serve/static, read once (they are a few kilobytes each)."""
    return resources.files("edgelm.serve").joinpath("static", name).read_bytes()


def page_file(name: str, media_type: str) -> Response:
    """A file of the page with the page's security headers."""
    return Response(packaged(name), media_type=media_type, headers=SECURITY_HEADERS)


async def index(request: Request) -> Response:
    return page_file(INDEX, HTML)


async def static_file(request: Request) -> Response:
    name = request.path_params["name"]
    media_type = STATIC_FILES.get(name)  # a lookup in a fixed table, never a path joined to a folder
    if media_type is None:
        raise ApiError(404, f"no page file {quoted(name)}", code="not_found")
    return page_file(name, media_type)


def page_routes() -> list[Route]:
    """`/` and `/static/NAME`; an unknown name is a 404 in OpenAI's error shape."""
    return [Route("/", index, methods=["GET"]), Route("/static/{name:path}", static_file, methods=["GET"])]
