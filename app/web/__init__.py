"""The web page at `/` (static HTML, CSS and JS from this folder) and the API docs served offline.

The page (`static/index.html`, `app.js`, `app.css`) is plain files: no build step, nothing from another host; it talks to the
v1 JSON API with fetch(). `/docs` (Swagger UI) and `/redoc` (ReDoc) load their scripts and styles from the files that
the `fastapi-offline` package ships, served by the app under `/docs/assets/`, so both work on a machine without
internet. The page and its assets are open (the page asks for the API key itself); `/docs`, `/redoc` and
`/openapi.json` keep their rule in `app.auth.private_route_error` (a key when keys are required, unless public_docs).
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

PAGE_DIR = Path(__file__).resolve().parent / "static"
DOCS_ASSETS = Path(str(files("fastapi_offline") / "static"))
PAGE_URL = "/web"
ASSETS_URL = "/docs/assets"
DOCS_URL, REDOC_URL, OAUTH2_REDIRECT_URL = "/docs", "/redoc", "/docs/oauth2-redirect"

#: the page runs only its own files: scripts, styles and connections to this origin; images also from blob: and data:
#: URLs (the photos the user picks and the restored results)
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


def install(app: FastAPI) -> None:
    """Serve the page at `/` (assets under `/web/`) and the offline `/docs`, `/redoc` and `/docs/oauth2-redirect`
    (create the app with `docs_url=None, redoc_url=None`)."""
    app.mount(PAGE_URL, StaticFiles(directory=PAGE_DIR, check_dir=True), name="web")
    app.mount(ASSETS_URL, StaticFiles(directory=DOCS_ASSETS, check_dir=True), name="docs-assets")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                     "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})

    def root(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        return get_swagger_ui_html(
            openapi_url=base + app.openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{base}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{base}{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=base + OAUTH2_REDIRECT_URL,
            swagger_ui_parameters={"validatorUrl": None})  # no badge fetched from the public validator

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        return get_redoc_html(openapi_url=base + app.openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{base}{ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{base}{ASSETS_URL}/favicon.png", with_google_fonts=False)
