"""The web page at `/` in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium, never a downloaded
browser) against the embedded `faceadapt serve` with API keys required. Restore a shared real-world photo and read the
before/after, upload a domain, run a tiny adaptation to success while its progress moves, cancel another, the key
prompt, the page at 360 px, and /docs and /redoc with every request to another host blocked.

Screenshots go to `FACEADAPT_TEST_ARTEFACTS` (default `test-artefacts/web` in the repo, ignored by git); the folder is
printed at the end of the module.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

pytest_plugins = ["test_service_harness"]

from test_service_harness import (
    REPO,
    SHARED,
    TINY_PARAMS,
    ensure_default_models,
    face_files,
    free_port,
    wait_ready,
)

CHROMIUM = os.environ.get("FACEADAPT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTEFACTS = Path(os.environ.get("FACEADAPT_TEST_ARTEFACTS", REPO / "test-artefacts" / "web"))
FACEADAPT = str(Path(sys.executable).parent / "faceadapt")
PHOTOS = SHARED / "data" / "realworld" / "whole"
DESKTOP = {"width": 1280, "height": 900}

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
expect = playwright_api.expect


class WebServe:
    """`faceadapt serve` (embedded: SQLite, local storage, one worker) with FACEADAPT_REQUIRE_KEYS=true."""

    def __init__(self, home: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FACEADAPT_")}
        env.update({"FACEADAPT_HOME": str(home), "FACEADAPT_MIN_ADAPT_IMAGES": "2", "FACEADAPT_MODELS_DIR": str(home / "models"),
                    "FACEADAPT_FACEXLIB_MODEL_ROOT": str(SHARED / "weights" / "facexlib"),
                    "FACEADAPT_SHARED": str(SHARED), "FACEADAPT_DEVICE": "cpu", "FACEADAPT_REQUIRE_KEYS": "true",
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        ensure_default_models(home, env)
        self.env, self.port = env, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "serve.log"
        (home / "cwd").mkdir(exist_ok=True)
        self.log_file = self.log.open("wb")  # closed by stop()
        self.proc = subprocess.Popen([FACEADAPT, "serve", "--port", str(self.port)], env=env, cwd=home / "cwd",
                                     stdout=subprocess.DEVNULL, stderr=self.log_file, start_new_session=True)
        self.proc.url = self.url
        wait_ready(self.proc, self.log)
        out = subprocess.run([FACEADAPT, "keys", "create", "--tenant", "web"], env=env, cwd=home / "cwd",
                             capture_output=True, text=True, check=True)
        self.key = out.stdout.strip()

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C: the API and its worker stop
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log_file.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = WebServe(tmp_path_factory.mktemp("faceadapt-web"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory, request):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run installs it); no browser is downloaded")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport=DESKTOP, accept_downloads=True)
        try:
            yield ctx
        finally:
            ctx.close()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"web page screenshots: {ARTEFACTS}")


def shot(page, name: str, full_page: bool = True) -> Path:
    path = ARTEFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def open_page(ctx, server: WebServe, hash_: str = "", viewport: dict | None = None):
    """A new tab (its own sessionStorage: no key yet): the key prompt comes up, the key is entered."""
    page = ctx.new_page()
    if viewport:
        page.set_viewport_size(viewport)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    page.goto(f"{server.url}/{hash_}")
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#key-input", server.key)
    page.click("#key-save")
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator("body")).to_have_attribute("data-ready", "yes", timeout=30_000)
    return page


def upload_domain(page, files: list[str | Path], name: str, folder: bool = False) -> None:
    page.click("#tab-domains")
    page.fill("#domain-name", name)
    page.set_input_files("#domain-folder" if folder else "#domain-files", files)
    page.click("#domain-go")
    expect(page.locator("#domain-status")).to_have_class("status ok", timeout=60_000)
    expect(page.locator("#domain-progress")).to_have_attribute("value", "100")


def unlabelled_controls(page) -> list[str]:
    return page.evaluate("""() => Array.from(document.querySelectorAll('input, select, textarea, button'))
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                && !(el.tagName === 'BUTTON' && el.textContent.trim()))
        .map(el => el.id || el.outerHTML.slice(0, 80))""")


def test_key_prompt(server, browser):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()  # keys are required: the first call's 401 brings the prompt
    expect(page.locator("#key-reason")).to_contain_text("API key is required")
    expect(page.locator("#key-input")).to_be_focused()
    page.fill("#key-input", "fa_wrong")
    page.keyboard.press("Enter")
    expect(page.locator("#key-reason")).to_contain_text("unknown or revoked API key")  # a 401: the prompt again
    expect(dialog).to_be_visible()
    page.fill("#key-input", server.key)
    page.click("#key-save")
    expect(dialog).to_be_hidden()
    expect(page.locator("body")).to_have_attribute("data-ready", "yes", timeout=30_000)
    expect(page.locator("#key-state")).to_have_text("API key set for this tab")
    assert page.evaluate("sessionStorage.getItem('faceadapt.apiKey')") == server.key
    assert page.evaluate("localStorage.length") == 0 or server.key not in json.dumps(
        page.evaluate("Object.assign({}, localStorage)"))  # the key itself is kept in this tab only
    expect(page.locator("#restore-model option[value='faceadapt-swinir-small']")).to_have_count(1)
    # every control has a label, and the tabs work from the keyboard
    assert unlabelled_controls(page) == []
    page.focus("#tab-restore")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-domains")).to_be_focused()
    expect(page.locator("#panel-domains")).to_be_visible()
    expect(page.locator("#panel-restore")).to_be_hidden()
    page.keyboard.press("End")
    expect(page.locator("#panel-models")).to_be_visible()
    expect(page.locator(".model[data-name='faceadapt-swinir-small']")).to_contain_text("64 px")
    # forgetting the key: the next call's 401 brings the prompt back
    page.click("#key-open")
    page.click("#key-forget")
    expect(dialog).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('faceadapt.apiKey')") is None
    shot(page, "key-prompt", full_page=False)
    assert errors == []
    page.close()


def test_restore_photos(server, browser):
    from PIL import Image, ImageChops

    page = open_page(browser, server)
    model = httpx.get(f"{server.url}/v1/models/default", headers={"Authorization": f"Bearer {server.key}"}).json()
    size = model["card"].get("serve_size") or model["card"]["input_size"]  # the size the bundled restorer restores at
    expect(page.locator("#restore-model-note")).to_contain_text(f"{size} px demo restorer")
    photos = [PHOTOS / "Blake_Lively.jpg", PHOTOS / "01.jpg"]  # the last one is shown first
    # what the API answers for each photo (JSON), which the page must show face by face
    expected = {}
    for photo in photos:
        r = httpx.post(f"{server.url}/v1/restore", files={"image": (photo.name, photo.read_bytes())},
                       headers={"Authorization": f"Bearer {server.key}", "Accept": "application/json"}, timeout=300)
        assert r.status_code == 200, r.text
        expected[photo.name] = r.json()["modes"]
    # Blake_Lively.jpg's largest face (210 px) would be blurred by the upsampled output: the never-worse check gives it
    # the detail-preserving paste instead
    assert expected["Blake_Lively.jpg"].get("detail_preserving", 0) >= 1, expected
    page.set_input_files("#restore-files", [str(p) for p in photos])
    page.click("#restore-go")
    expect(page.locator(".result")).to_have_count(2, timeout=120_000)
    expect(page.locator("#restore-status")).to_have_text("Restored 2 of 2 photo(s).")
    for photo, faces in ((photos[0], 2), (photos[1], 4)):
        modes = expected[photo.name]
        assert sum(modes.values()) == faces, modes
        card = page.locator(f".result[data-file='{photo.name}']")
        expect(card).to_have_attribute("data-faces-found", str(faces))
        expect(card.locator(".face")).to_have_count(faces)
        for mode, n in modes.items():
            expect(card.locator(f".face[data-mode='{mode}']")).to_have_count(n)
        if modes.get("detail_preserving"):
            expect(card.locator("figcaption", has_text="detail-preserving")).to_have_count(modes["detail_preserving"])
        sizes = card.locator(".compare img").evaluate_all("imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
        assert sizes == [list(Image.open(photo).size)] * 2  # after and before, the same size
        # the before/after slider moves the split
        slider = card.locator("input[type=range]")
        slider.focus()
        slider.press("Home")
        assert card.locator(".compare").evaluate("c => c.style.getPropertyValue('--pos')") == "0%"
        slider.fill("30")
        assert card.locator(".compare").evaluate("c => c.style.getPropertyValue('--pos')") == "30%"
        # download the result: the restored image, the photo's size, and its faces changed
        with page.expect_download() as dl:
            card.locator("a[download]").click()
        assert dl.value.suggested_filename == f"{photo.stem}-restored.png"
        restored = Image.open(dl.value.path()).convert("RGB")
        original = Image.open(photo).convert("RGB")
        assert restored.size == original.size
        assert ImageChops.difference(restored, original).getbbox() is not None
    page.locator(".result[data-file='01.jpg'] input[type=range]").fill("50")
    shot(page, "restore-desktop")
    page.evaluate("window.scrollTo(0, 0)")
    bottom = page.locator(".result[data-file='01.jpg'] .faces").bounding_box()
    page.screenshot(path=str(ARTEFACTS / "readme-restore.png"), full_page=True,  # docs/images/web_page.png
                    clip={"x": 0, "y": 0, "width": DESKTOP["width"], "height": bottom["y"] + bottom["height"] + 16})
    assert page.errors == []
    page.close()


def test_upload_domain(server, browser, tmp_path):
    from PIL import Image

    folder = tmp_path / "domain"
    folder.mkdir()
    for f in face_files(4, offset=20):
        (folder / f.name).write_bytes(f.read_bytes())
    Image.new("RGB", (96, 96), (90, 140, 200)).save(folder / "sky.png")  # an image without a face
    (folder / "notes.txt").write_text("not an image")
    page = open_page(browser, server)
    upload_domain(page, [str(folder)], "web-folder", folder=True)
    expect(page.locator("#domain-status")).to_contain_text("4 image(s) accepted, 4 face(s) found, 2 rejected")
    rows = page.locator("#domain-result tbody tr")
    expect(rows).to_have_count(6)
    expect(page.locator("#domain-result tr.accepted")).to_have_count(4)
    expect(page.locator("#domain-result tr.accepted img.thumb")).to_have_count(4)
    expect(page.locator("#domain-result tr.rejected", has_text="sky.png")).to_contain_text("no face found")
    expect(page.locator("#domain-result tr.rejected", has_text="notes.txt")).to_contain_text("rejected:")
    item = page.locator("#domain-list li", has_text="web-folder")
    expect(item).to_contain_text("4 image(s), 4 face(s)")
    shot(page, "domain-upload")
    page.once("dialog", lambda d: d.accept())
    item.get_by_role("button", name="Delete the domain web-folder").click()
    expect(page.locator("#domain-status")).to_have_text("Deleted the domain web-folder.")
    expect(page.locator("#domain-list li", has_text="web-folder")).to_have_count(0)
    assert page.errors == []
    page.close()


def start_adaptation(page, name: str, params: dict) -> None:
    page.click("#tab-adapt")
    page.fill("#adapt-name", name)
    page.locator("#panel-adapt details summary").first.click()
    page.fill("#adapt-json", json.dumps(params))
    page.click("#adapt-go")
    expect(page.locator("#job-view")).to_be_visible()
    expect(page.locator("#job-title")).to_contain_text(name)


def zip_of(files: list[Path], path: Path) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in files:
            z.writestr(f.name, f.read_bytes())
    path.write_bytes(buf.getvalue())
    return path


def test_adapt_to_success(server, browser, tmp_path):
    page = open_page(browser, server)
    upload_domain(page, [str(zip_of(face_files(6, offset=40), tmp_path / "faces.zip"))], "web-zip")
    expect(page.locator("#domain-status")).to_contain_text("6 image(s) accepted")
    # enough fine-tune steps that a sampling every 0.2 s sees the running stage's done / total on a quiet machine too
    params = {**TINY_PARAMS, "finetune": {**TINY_PARAMS["finetune"], "steps": 60, "ckpt_every": 60}}
    start_adaptation(page, "web-v1", params)
    view = page.locator("#job-view")
    seen, details = [], set()
    deadline = time.time() + 240
    while (status := view.get_attribute("data-status")) not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, f"still {status}; seen {seen}"
        if not seen or seen[-1] != status:
            seen.append(status)
        details.update(t for t in page.locator(".stage.running .detail").all_inner_texts() if t)
        time.sleep(0.2)
    assert status == "succeeded", page.locator("#job-error").inner_text()
    assert int(view.get_attribute("data-streamed") or 0) >= 3  # followed through the server's event stream
    running = [s for s in seen if s not in ("queued",)]
    assert len(running) >= 2, seen  # the progress moved through the stages on the page
    assert any(" / " in d for d in details), details  # done / total of a running stage
    expect(page.locator(".stage.done")).to_have_count(5)
    expect(page.locator("#job-events li", has_text="succeeded: model 'web-v1'")).to_have_count(1)
    figures = page.locator("#job-result table.figures")
    expect(figures).to_contain_text("consistency_psnr")
    expect(figures.locator("thead")).to_contain_text("adapted")
    expect(page.locator("#job-gate")).to_contain_text("Quality gate:")
    grid = page.locator("#job-grid")
    expect(grid).to_be_visible(timeout=30_000)
    assert grid.evaluate("g => g.naturalWidth") > 0
    shot(page, "adapt-succeeded")
    # the new model is in the restore picker and in Models
    expect(page.locator("#restore-model option[value='web-v1']")).to_have_count(1, timeout=30_000)
    page.click("#tab-models")
    expect(page.locator(".model[data-name='web-v1']")).to_contain_text("adapted by you")
    expect(page.locator(".model[data-name='web-v1'] button", has_text="Delete")).to_be_visible()
    shot(page, "models")
    assert page.errors == []
    page.close()


STREAM = (": a stream cut by a proxy after two messages (the stream's format: GET /v1/adaptations/{id}/stream)\n\n"
          "id: 0\nevent: status\n"
          'data: {"id": "x", "status": "preparing", "progress": {"stage": "prepare", "done": 1, "total": 4}}\n\n'
          "id: 999999\r\nevent: event\r\n"
          'data: {"id": 999999, "ts": "2026-01-01T00:00:00Z", "stage": "prepare", "kind": "info",\r\n'
          'data:  "message": "from the stream"}\r\n\r\n')


STREAM_CALLS: list[str | None] = []  # the Last-Event-ID of each connection the page made to the stand-in


def stream_stub(route, request=None):
    """The first connection gets STREAM (then it is cut); the page reconnects, gets a 503 and falls back to polling."""
    STREAM_CALLS.append(route.request.headers.get("last-event-id"))
    if len(STREAM_CALLS) == 1:
        return route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=STREAM)
    return route.fulfill(status=503, headers={"Content-Type": "application/json"},
                         body='{"error": "unavailable", "detail": "stand-in"}')


def test_cancel_adaptation(server, browser, tmp_path):
    """Cancel a running job. Its stream is cut after two messages and then refused: the page shows the messages,
    reconnects after the last event it has, and goes on polling."""
    page = open_page(browser, server)
    page.route("**/v1/adaptations/*/stream", stream_stub)
    upload_domain(page, [str(zip_of(face_files(4, offset=60), tmp_path / "faces.zip"))], "web-cancel")
    params = {**TINY_PARAMS, "finetune": {**TINY_PARAMS["finetune"], "steps": 2000, "ckpt_every": 100}}
    start_adaptation(page, "web-cancelled", params)
    view = page.locator("#job-view")
    expect(view).to_have_attribute("data-streamed", "2")  # both messages parsed (LF and CRLF lines, 2 data lines)
    expect(page.locator("#job-transport")).to_contain_text("polling")  # the reconnect was refused: polling
    assert STREAM_CALLS[-1] == "999999"  # it reconnected after the last event it had
    expect(view).to_have_attribute("data-status", "finetuning", timeout=120_000)
    page.click("#job-cancel")
    expect(page.locator("#adapt-status")).to_contain_text("Cancel requested")
    expect(view).to_have_attribute("data-status", "cancelled", timeout=90_000)
    expect(page.locator(".stage.cancelled")).to_have_count(1)
    expect(page.locator("#job-cancel")).to_be_hidden()  # nothing left to cancel
    expect(page.locator("#job-list li[data-status='cancelled']", has_text="web-cancelled")).to_have_count(1)
    shot(page, "adapt-cancelled")
    assert page.errors == []
    page.close()


def test_narrow_screen(server, browser):
    page = open_page(browser, server, viewport={"width": 360, "height": 740})
    for tab in ("restore", "domains", "adapt", "models"):
        page.click(f"#tab-{tab}")
        expect(page.locator(f"#panel-{tab}")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 360, tab  # nothing wider than the screen
        box = page.locator(f"#tab-{tab}").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 360, tab
    page.click("#tab-restore")
    page.set_input_files("#restore-files", str(PHOTOS / "04.jpg"))
    page.click("#restore-go")
    expect(page.locator(".result .face")).to_have_count(1, timeout=120_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    compare = page.locator(".result .compare").bounding_box()
    assert compare["width"] <= 360
    shot(page, "restore-360")
    assert page.errors == []
    page.close()


def test_docs_offline(server, browser):
    """/docs and /redoc load only files the app serves: every request to another host is blocked."""
    page = browser.new_page()
    foreign = []

    def gate(route):
        host = urlparse(route.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            foreign.append((route.request.resource_type, route.request.url))
            route.abort()

    page.route("**/*", gate)
    assert page.goto(server.url + "/docs").status == 401  # keys required: the docs take a key (public_docs off)
    page.set_extra_http_headers({"Authorization": f"Bearer {server.key}"})
    page.goto(server.url + "/docs")
    expect(page.locator(".swagger-ui .opblock-summary-path", has_text="/v1/restore")).to_have_count(1, timeout=30_000)
    shot(page, "docs-swagger", full_page=False)
    page.goto(server.url + "/redoc")
    expect(page.get_by_text("/v1/adaptations/{job_id}/cancel").first).to_be_attached(timeout=30_000)
    shot(page, "docs-redoc", full_page=False)
    # nothing that the pages need comes from elsewhere (ReDoc's bundle links its own logo image, which may be asked)
    assert [u for kind, u in foreign if kind != "image"] == [], foreign
    page.close()


def test_page_and_docs_files_are_local(server):
    """The page needs no key (it asks for one) and runs only its own files; the docs pages name no other host."""
    c = httpx.Client(base_url=server.url, timeout=30)
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for path, kind in (("/web/app.js", "javascript"), ("/web/app.css", "text/css"),
                       ("/docs/assets/swagger-ui-bundle.js", "javascript"), ("/docs/assets/redoc.standalone.js",
                                                                             "javascript")):
        r = c.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
    assert c.get("/web/missing.js").status_code == 404
    for path in ("/docs", "/redoc"):
        assert c.get(path).status_code == 401  # the existing rule: a key when keys are required
        html = c.get(path, headers={"Authorization": f"Bearer {server.key}"}).text
        assert "/docs/assets/" in html and "http://" not in html and "https://" not in html, html
    assert "/" not in c.get("/openapi.json", headers={"Authorization": f"Bearer {server.key}"}).json()["paths"]
