"""The read-only web view of the registry: server-rendered HTML, no JavaScript, no external assets.

Pages (all GET, outside ``/v1/``, which belongs to the object endpoint):

    /                               every model and tag the viewer may read; ``?q=`` filters by name
    /models/NAME:TAG                config summary, per-layer chart, tensor table (``?sort=&order=``), files, pull lines
    /compare/NAME:A...NAME:B        what changed, bytes to fetch, shards shared (``shardstore.repo.diff``)
    /signin, /signout               the read token, kept in an HttpOnly cookie (``shardstore.http.access``)

Why no JavaScript: sorting and filtering are links and a GET form, so the pages work in any
browser, offline, and the Content-Security-Policy can forbid every script. Store reads and
rendering run in a worker thread so the gRPC server on the same event loop never waits on them.

Tokens: on a server with tokens, a request without a known token is sent to the sign-in form and
sees no name; a prefix-scoped token sees only the names under its prefixes, and a name it may not
read answers exactly as a name that does not exist. Pages never show the store's URL or a token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
from aiohttp import web

from shardstore.errors import InvalidInputError, NotFoundError, ShardstoreError
from shardstore.http.access import TOKEN_COOKIE, may_read, request_grants
from shardstore.http.app import HTTP_CONTEXT, HttpContext
from shardstore.http.pages import MissingModel, Pages
from shardstore.repo.refs import Ref, parse_ref
from shardstore.repo.repository import Repository
from shardstore.rpc.auth import AuthenticationError, Grant
from shardstore.sizes import human_bytes

log = logging.getLogger("shardstore.http.webview")

COMPARE_SEPARATOR = "..."
# Columns the tensor table sorts by, and the key of each; None values (a lossless tensor's SNR) sort last.
SORT_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "name": lambda t: t["name"],
    "dtype": lambda t: t["dtype"],
    "shape": lambda t: t["shape"],
    "codec": lambda t: t["codec"],
    "raw": lambda t: t["raw"],
    "stored": lambda t: t["stored"],
    "ratio": lambda t: t["ratio"],
    "snr": lambda t: t["snr"],
    "max_error": lambda t: t["max_error"],
}
SECURITY_HEADERS = {
    # Nothing but our own stylesheet: no script runs, no page frames us, forms post only here.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Pages show what a token may read: no shared cache may keep them.
    "Cache-Control": "no-store",
}
PAGES = web.AppKey("shardstore.webview.pages", Pages)
TEMPLATES = web.AppKey("shardstore.webview.templates", jinja2.Environment)
# Pages get their own two threads: a burst of page views (rendering holds the GIL) waits for these,
# never for the default executor that the object GETs of caches and mirrors use.
WORKERS = web.AppKey("shardstore.webview.workers", ThreadPoolExecutor)
PAGE_THREADS = 2



def _figure(value: float | None, digits: int = 3) -> str:
    """A measured figure to ``digits`` significant digits; None (nothing lost) reads "exact"."""
    return "exact" if value is None else f"{value:.{digits}g}"


def _when(stamp: datetime | None) -> str:
    return stamp.strftime("%Y-%m-%d %H:%M UTC") if stamp is not None else "-"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("shardstore.http", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["size"] = human_bytes
    env.filters["figure"] = _figure
    env.filters["when"] = _when
    env.filters["urlpath"] = lambda text: quote(str(text), safe="/:")
    return env


def _context(request: web.Request) -> HttpContext:
    return request.app[HTTP_CONTEXT]


def _grants(request: web.Request) -> tuple[Grant, ...]:
    return request_grants(request, _context(request).tokens)


def _render(request: web.Request, template: str, **values: Any) -> str:
    """The page's HTML; call from any thread (a Jinja2 environment renders concurrently)."""
    return request.app[TEMPLATES].get_template(template).render(
        tokens=_context(request).tokens is not None, signed_in=bool(_grants(request)), **values)


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                        headers=SECURITY_HEADERS)


def _page(request: web.Request, template: str, status: int = 200, **values: Any) -> web.Response:
    """A small page (sign-in, errors) rendered on the loop; data pages render in a worker (:func:`_run_page`)."""
    return _html(_render(request, template, **values), status)


async def _in_thread(request: web.Request, func: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(request.app[WORKERS], func)


def _signin_redirect(request: web.Request) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"/signin?next={quote(request.path_qs, safe='')}")


def _readable(request: web.Request) -> Callable[[str], bool]:
    """Which names the request's token may read; raises a redirect to the sign-in form when it has none."""
    grants = _grants(request)
    if not grants:
        raise _signin_redirect(request)
    return lambda name: may_read(grants, name)


def _ref(request: web.Request, text: str, readable: Callable[[str], bool]) -> Ref:
    try:
        ref = parse_ref(text)
    except InvalidInputError:
        raise _error(request, 400, f"{text!r} is not a model reference (like org/model:v1)") from None
    if not readable(ref.name):
        raise _missing(request, ref)  # exactly as for a model that does not exist: names stay private
    return ref


_ERRORS: dict[int, type[web.HTTPException]] = {400: web.HTTPBadRequest, 403: web.HTTPForbidden,
                                               404: web.HTTPNotFound, 500: web.HTTPInternalServerError}


def _error(request: web.Request, status: int, message: str) -> web.HTTPException:
    """An error page to raise: the message must name only what the viewer gave (never a path or token)."""
    page = _page(request, "error.html", status=status, message=message)
    return _ERRORS[status](text=page.text, content_type="text/html", headers=SECURITY_HEADERS)


def _missing(request: web.Request, ref: Ref | str) -> web.HTTPException:
    return _error(request, 404, f"no model {ref} here")


async def _run_page(request: web.Request, build: Callable[[], dict[str, Any]], template: str) -> web.Response:
    """Build a page's figures and its HTML in a worker thread; store faults become an error page naming no path."""
    try:
        html = await _in_thread(request, lambda: _render(request, template, **build()))
    except web.HTTPException:
        raise
    except MissingModel as exc:
        raise _missing(request, exc.ref) from None  # the same page as for a name the token may not read
    except NotFoundError:
        raise _error(request, 404, "no such model here (it may have been deleted since the page that linked it)") \
            from None
    except ShardstoreError as exc:
        log.error("web view %s: %s", request.path, exc)  # the operator's log may name the store; the page does not
        raise _error(request, 500, "the store could not be read; the server log says why") from None
    return _html(html)


async def registry_page(request: web.Request) -> web.Response:
    readable = _readable(request)
    pages = request.app[PAGES]
    query = request.query.get("q", "").strip()

    def build() -> dict[str, Any]:
        versions = pages.versions(readable)
        shown = [v for v in versions if query.lower() in v.ref.name] if query else versions
        return {"versions": shown, "total": len(versions), "query": query,
                "base_names": pages.base_names(versions)}

    return await _run_page(request, build, "registry.html")


def _pull_lines(request: web.Request, ref: Ref) -> dict[str, str]:
    context = _context(request)
    folder = f"./{ref.name.rsplit('/', 1)[-1]}-{ref.tag}"
    if context.grpc_port is None:
        source = str(ref)
    else:
        host = request.url.host or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        source = f"{'grpcs' if context.grpc_tls else 'grpc'}://{host}:{context.grpc_port}/{ref}"
    return {
        "cli": f"shardstore pull {source} {folder}",
        "python": f'import shardstore\nshardstore.pull("{source}", "{folder}")\n'
                  f'model = shardstore.open("{source}")  # lazy: reads only the tensors you ask for',
    }


async def model_page(request: web.Request) -> web.Response:
    readable = _readable(request)
    ref = _ref(request, request.match_info["ref"], readable)
    pages = request.app[PAGES]
    sort = request.query.get("sort", "")
    order = "desc" if request.query.get("order") == "desc" else "asc"

    def build() -> dict[str, Any]:
        page = pages.model(ref, readable)
        if sort in SORT_KEYS:
            key = SORT_KEYS[sort]
            present = [t for t in page.tensors if key(t) is not None]
            absent = [t for t in page.tensors if key(t) is None]
            page.tensors = sorted(present, key=key, reverse=order == "desc") + absent
        widest = max((bar.raw_bytes for bar in page.layers), default=0) or 1
        return {"page": page, "ref": ref, "sort": sort, "order": order, "widest": widest,
                "pull": _pull_lines(request, ref)}

    return await _run_page(request, build, "model.html")


async def compare_form(request: web.Request) -> web.Response:
    """``/compare?a=NAME:A&b=NAME:B`` (the model page's form) → ``/compare/NAME:A...NAME:B``."""
    a, b = request.query.get("a", ""), request.query.get("b", "")
    if not a or not b:
        raise _error(request, 400, "compare needs two versions, as /compare/NAME:A...NAME:B")
    raise web.HTTPSeeOther(f"/compare/{quote(a, safe='/:')}{COMPARE_SEPARATOR}{quote(b, safe='/:')}")


async def compare_page(request: web.Request) -> web.Response:
    readable = _readable(request)
    spec = request.match_info["spec"]
    a_text, sep, b_text = spec.partition(COMPARE_SEPARATOR)
    if not sep or not a_text or not b_text:
        raise _error(request, 400, "compare two versions as /compare/NAME:A...NAME:B")
    a, b = _ref(request, a_text, readable), _ref(request, b_text, readable)
    pages = request.app[PAGES]

    def build() -> dict[str, Any]:
        return {"diff": pages.compare(a, b), "a": a, "b": b}

    return await _run_page(request, build, "compare.html")


def _safe_next(target: str) -> str:
    """Only a path on this server: never an open redirect to another site."""
    parts = urlsplit(target)
    if not target.startswith("/") or target.startswith("//") or parts.scheme or parts.netloc or "\\" in target:
        return "/"
    return target


def _same_origin(request: web.Request) -> bool:
    """A form post from another site (login CSRF) carries its own Origin; browsers send one with every POST."""
    origin = request.headers.get("Origin")
    return origin is None or origin == "null" or urlsplit(origin).netloc == request.host


async def signin_form(request: web.Request) -> web.Response:
    if _context(request).tokens is None:
        raise web.HTTPSeeOther("/")
    return _page(request, "signin.html", next=_safe_next(request.query.get("next", "/")), problem="")


async def signin(request: web.Request) -> web.Response:
    tokens = _context(request).tokens
    if tokens is None:
        raise web.HTTPSeeOther("/")
    if not _same_origin(request):
        raise _error(request, 403, "sign-in forms must be posted from this site")
    form = await request.post()
    token = str(form.get("token", "")).strip()
    target = _safe_next(str(form.get("next", "/")))
    try:
        tokens.grants(token)
    except AuthenticationError:
        return _page(request, "signin.html", status=401, next=target,
                     problem="That token is not known here." if token else "Enter a token.")
    response = web.HTTPSeeOther(target)
    # HttpOnly: no script can read it; SameSite=Strict: no other site's request carries it.
    response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/", secure=request.secure)
    raise response


async def signout(request: web.Request) -> web.Response:
    if not _same_origin(request):
        raise _error(request, 403, "sign-out forms must be posted from this site")
    response = web.HTTPSeeOther("/signin" if _context(request).tokens is not None else "/")
    response.del_cookie(TOKEN_COOKIE, path="/")
    raise response


_STYLESHEET: bytes | None = None


async def stylesheet(request: web.Request) -> web.Response:
    global _STYLESHEET
    if _STYLESHEET is None:
        _STYLESHEET = resources.files("shardstore.http").joinpath("templates/style.css").read_bytes()
    return web.Response(body=_STYLESHEET, content_type="text/css", charset="utf-8",
                        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})


def add_routes(app: web.Application) -> None:
    """Register the web view's routes on ``app``."""
    app[PAGES] = Pages(Repository(app[HTTP_CONTEXT].store))
    app[WORKERS] = workers = ThreadPoolExecutor(max_workers=PAGE_THREADS, thread_name_prefix="shardstore-webview")

    async def stop_workers(_app: web.Application) -> None:
        workers.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(stop_workers)
    app[TEMPLATES] = env = _environment()
    for name in ("registry.html", "model.html", "compare.html", "signin.html", "error.html"):
        env.get_template(name)  # compiled at start (about 0.1 s), not on some visitor's first page
    app.router.add_get("/", registry_page)
    app.router.add_get("/models/{ref:.+}", model_page)
    app.router.add_get("/compare", compare_form)
    app.router.add_get("/compare/{spec:.+}", compare_page)
    app.router.add_get("/signin", signin_form)
    app.router.add_post("/signin", signin)
    app.router.add_post("/signout", signout)
    app.router.add_get("/assets/style.css", stylesheet)
