"""The search page in a real browser: ``ciea serve`` started as a subprocess on a real
``ciea embed`` table, driven by Selenium through Debian's headless Chromium.

Types a query, submits, waits for the result cards, checks every thumbnail decoded
(``naturalWidth > 0``), toggles the ``w`` overlay on and off, checks that a bad request
shows the server's error on the page, asks with a picture picked through the file input and
follows a result's "more like this" link, and sends bad pictures (over the upload cap, not a
picture, a decompression bomb) through the page and the API: each gets a one-line error and
the server writes nothing (it runs in an empty working dir and temp dir of its own).

Skips when chromium / chromedriver are missing, unless ``CIEA_REQUIRE_BROWSER=1`` (CI sets
it), in which case it fails: a CI image without the browser must not pass silently.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from embed_helpers import make_checkpoint, synthetic_records, write_corpus  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CHROMIUM = os.environ.get("CIEA_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CIEA_CHROMEDRIVER", "/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]
TABLE = "docs"
N_IMAGES, N_TEXTS = 24, 8
WAIT_S = 60


def _browser_missing() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (Path(p).is_file() and os.access(p, os.X_OK))]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    return ", ".join(missing) or None


@pytest.fixture(scope="module", autouse=True)
def _require_browser():
    missing = _browser_missing()
    if missing is None:
        return
    message = f"browser test needs {missing} (Debian: apt-get install chromium chromium-driver)"
    if os.environ.get("CIEA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"CIEA_REQUIRE_BROWSER=1 but {message}", pytrace=False)
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def table(tmp_path_factory, ray_local) -> str:
    """A real embedded table: Delta corpus → ``ciea embed`` (on the session's Ray)."""
    from jobs import embed

    tmp = tmp_path_factory.mktemp("serve-e2e")
    records = synthetic_records(N_IMAGES, N_TEXTS, seed=11)
    root = tmp / "data"
    write_corpus(root, records)
    ckpt = make_checkpoint(tmp, [r["caption"] or r["text"] for r in records], seed=0)
    rc = embed.main(["--checkpoint", ckpt, "--root", str(root), "--table", TABLE, "--run-dir", str(tmp / "runs"),
                     "--no-progress", "--set", "encode.threads=1", "--set", "encode.batch_size=32"])
    assert rc == 0
    return str(root / "lancedb")


@pytest.fixture(scope="module")
def server(table, tmp_path_factory):
    """``ciea serve`` as a separate process, as a user starts it."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    # An empty working dir and temp dir of its own: a test can see that an upload leaves
    # nothing behind there (the picture is held in memory only).
    cwd, tmp = tmp_path_factory.mktemp("serve-cwd"), tmp_path_factory.mktemp("serve-tmp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp), "TMP": str(tmp),
           "TEMP": str(tmp), "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "serve", "--db", table, "--table", TABLE, "--port", str(port),
             "--set", "server.log_level=warning"], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ciea serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/api/health", timeout=5) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"ciea serve did not answer within 120 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield {"base": base, "health": health, "pid": proc.pid, "log": log, "cwd": cwd, "tmp": tmp}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    d.set_page_load_timeout(WAIT_S)
    try:
        yield d
    finally:
        d.quit()


def _search(driver, base: str, query: str, modality: str = "any") -> list:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(base + "/")
    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys(query)
    Select(driver.find_element(By.ID, "modality")).select_by_value(modality)
    driver.find_element(By.ID, "go").click()
    WebDriverWait(driver, WAIT_S).until(lambda d: "result" in d.find_element(By.ID, "status").text
                                        or "error" in d.find_element(By.ID, "status").get_attribute("class"))
    status = driver.find_element(By.ID, "status")
    assert "error" not in status.get_attribute("class"), status.text
    return driver.find_elements(By.CSS_SELECTOR, "#results .card")


def test_query_renders_result_images_and_the_w_overlay_toggles(driver, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cards = _search(driver, server["base"], "a red circle on a blue background")
    assert len(cards) == 10  # the page's default k
    assert [c.find_element(By.CSS_SELECTOR, ".rank").text for c in cards] == [f"#{i}" for i in range(1, 11)]
    images = driver.find_elements(By.CSS_SELECTOR, "#results .card img")
    assert images, "an image-and-text corpus should put image documents in the top 10"
    # Every thumbnail actually decoded in the browser (a broken data: URI has naturalWidth 0).
    WebDriverWait(driver, WAIT_S).until(
        lambda d: all(d.execute_script("return arguments[0].complete", img) for img in images))
    for img in images:
        assert driver.execute_script("return arguments[0].naturalWidth", img) > 0
        assert img.is_displayed()
    header = driver.find_element(By.ID, "table-info").text
    assert f"version {server['health']['version']}" in header and f"{N_IMAGES + N_TEXTS} documents" in header

    card = next(c for c in cards if c.get_attribute("data-modality") == "image")
    overlay = card.find_element(By.CSS_SELECTOR, ".overlay")
    toggle = card.find_element(By.CSS_SELECTOR, ".toggle-w")
    rows, cols = server["health"]["patch_grid"]
    assert not overlay.is_displayed() and toggle.get_attribute("aria-pressed") == "false"
    toggle.click()
    assert overlay.is_displayed() and toggle.get_attribute("aria-pressed") == "true"
    cells = overlay.find_elements(By.CSS_SELECTOR, ".cell")
    assert len(cells) == rows * cols
    # Drawn over the thumbnail: the overlay covers the image's box.
    img_box = card.find_element(By.CSS_SELECTOR, "img").rect
    ov_box = overlay.rect
    assert abs(ov_box["width"] - img_box["width"]) < 2 and abs(ov_box["height"] - img_box["height"]) < 2
    # The cells carry the hit's own weights (title "w = ...") and are coloured by them.
    shown = [float(c.get_attribute("title").rsplit("=", 1)[1]) for c in cells]
    assert all(0.0 <= w <= 1.0 for w in shown) and max(shown) > min(shown)
    colours = {c.value_of_css_property("background-color") for c in cells}
    assert len(colours) > 1
    toggle.click()
    assert not overlay.is_displayed() and toggle.get_attribute("aria-pressed") == "false"
    # Text documents have no image and no toggle.
    for c in cards:
        if c.get_attribute("data-modality") == "text":
            assert not c.find_elements(By.CSS_SELECTOR, "img")
            assert not c.find_element(By.CSS_SELECTOR, ".wrow").is_displayed()

    if os.environ.get("CIEA_SCREENSHOT"):  # docs/search-page.png is taken this way
        for c in [c for c in cards if c.get_attribute("data-modality") == "image"][:3]:
            c.find_element(By.CSS_SELECTOR, ".toggle-w").click()
        driver.save_screenshot(os.environ["CIEA_SCREENSHOT"])


def test_modality_filter_on_the_page(driver, server):
    from selenium.webdriver.common.by import By

    cards = _search(driver, server["base"], "a red circle", modality="text")
    assert len(cards) == N_TEXTS
    assert {c.find_element(By.CSS_SELECTOR, ".badge").text for c in cards} == {"text"}


def test_bad_request_shows_the_servers_error_on_the_page(driver, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # A shared link with an out-of-range k: the page runs it and shows what to fix.
    driver.get(server["base"] + "/?q=red&k=999")
    WebDriverWait(driver, WAIT_S).until(
        lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class"))
    assert "k must be a whole number from 1 to 50" in driver.find_element(By.ID, "status").text
    assert not driver.find_elements(By.CSS_SELECTOR, "#results .card")


def test_ask_with_a_picture_then_more_like_this(driver, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # The table's corpus (same generator, same seed): a document's own picture and caption.
    target = next(r for r in synthetic_records(N_IMAGES, N_TEXTS, seed=11) if r["modality"] == "image" and r["caption"])
    path = tmp_path / "query.png"
    path.write_bytes(target["image"])
    assert server["health"]["accepts_pictures"] is True

    driver.get(server["base"] + "/")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "picture-control").is_displayed())
    driver.find_element(By.ID, "q").send_keys(target["caption"])
    driver.find_element(By.ID, "picture").send_keys(str(path))  # picking a file runs the search
    status = driver.find_element(By.ID, "status")
    WebDriverWait(driver, WAIT_S).until(lambda d: "result" in status.text or "error" in status.get_attribute("class"))
    assert "error" not in status.get_attribute("class"), status.text
    assert "for the picture + " in status.text
    assert driver.find_element(By.ID, "picture-preview").is_displayed()
    assert driver.find_element(By.ID, "mode").get_attribute("disabled") is not None  # picture: vector only
    cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
    assert len(cards) == 10 and cards[0].get_attribute("data-doc-id") == target["doc_id"]

    # "more like this" on that result: its neighbours, without it.
    cards[0].find_element(By.CSS_SELECTOR, ".like").click()
    WebDriverWait(driver, WAIT_S).until(lambda d: f"like {target['doc_id']}" in status.text
                                        or "error" in status.get_attribute("class"))
    assert "error" not in status.get_attribute("class"), status.text
    ids = [c.get_attribute("data-doc-id") for c in driver.find_elements(By.CSS_SELECTOR, "#results .card")]
    assert len(ids) == 10 and target["doc_id"] not in ids
    assert f"like={target['doc_id']}" in driver.current_url
    assert not driver.find_element(By.ID, "picture-preview").is_displayed()  # the picture was let go

    # Garbage with a picture's name: the server's one-line refusal, shown inline.
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a picture")
    driver.find_element(By.ID, "picture").send_keys(str(bad))
    WebDriverWait(driver, WAIT_S).until(lambda d: "error" in status.get_attribute("class"))
    assert "image_unrecognised" in status.text and not driver.find_elements(By.CSS_SELECTOR, "#results .card")
    driver.find_element(By.ID, "picture-remove").click()
    assert not driver.find_element(By.ID, "picture-preview").is_displayed()
    assert driver.find_element(By.ID, "mode").get_attribute("disabled") is None


_DELIVER_PICTURE = """
const [how, b64, name, type, done] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const data = new DataTransfer();
if (type === "text") data.setData("text/plain", atob(b64));  // dragged or copied words
else data.items.add(new File([bytes], name, {type}));
if (how === "drop") {
  const form = document.getElementById("search-form");
  const over = new DragEvent("dragover", {dataTransfer: data, bubbles: true, cancelable: true});
  form.dispatchEvent(over);
  const dropped = new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true});
  form.dispatchEvent(dropped);
  done({taken: dropped.defaultPrevented, offered: over.defaultPrevented});
} else {
  const pasted = new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true});
  document.getElementById("q").dispatchEvent(pasted);
  done({taken: pasted.defaultPrevented, offered: true});
}
"""


@pytest.mark.parametrize("how", ["drop", "paste"])
def test_a_picture_dropped_on_or_pasted_into_the_search_box_asks_with_it(driver, server, how):
    """The two other ways in: the browser's own DragEvent / ClipboardEvent carrying a File
    (what a drag from the desktop or a screenshot paste delivers), through the page's
    handlers, to the same results as picking the file. Dropped or pasted text stays text."""
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    target = next(r for r in synthetic_records(N_IMAGES, N_TEXTS, seed=11) if r["modality"] == "image" and r["caption"])
    driver.get(server["base"] + "/")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "picture-control").is_displayed())
    status = driver.find_element(By.ID, "status")
    box = driver.find_element(By.ID, "q")
    box.send_keys(target["caption"])

    # Text delivered the same way is not a picture: the page leaves it to the box.
    plain = driver.execute_async_script(_DELIVER_PICTURE, how, base64.b64encode(b"red circle").decode(), "", "text")
    assert plain == {"taken": False, "offered": how == "paste"}, plain
    assert not driver.find_element(By.ID, "picture-preview").is_displayed()

    got = driver.execute_async_script(_DELIVER_PICTURE, how, base64.b64encode(target["image"]).decode(),
                                      "from-the-desktop.png", "image/png")
    assert got == {"taken": True, "offered": True}, got  # the page took the file, the browser did not open it
    WebDriverWait(driver, WAIT_S).until(lambda d: "result" in status.text or "error" in status.get_attribute("class"))
    assert "error" not in status.get_attribute("class"), status.text
    assert "for the picture + " in status.text
    assert driver.find_element(By.ID, "picture-preview").is_displayed()
    assert driver.find_element(By.ID, "mode").get_attribute("disabled") is not None
    cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
    assert len(cards) == 10 and cards[0].get_attribute("data-doc-id") == target["doc_id"]
    driver.find_element(By.ID, "picture-remove").click()


def _png_claiming(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's
    calling card: a decoder that trusts the header allocates width x height first)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _files_under(*roots: Path) -> set[str]:
    return {str(p) for root in roots for p in root.rglob("*")}


def _write_bytes(pid: int) -> int | None:
    """Bytes the process has caused to be written to storage (Linux ``/proc/PID/io``)."""
    try:
        lines = Path(f"/proc/{pid}/io").read_text().splitlines()
    except OSError:
        return None
    return next(int(line.split()[1]) for line in lines if line.startswith("write_bytes:"))


def test_bad_uploads_get_one_line_errors_and_nothing_is_written(driver, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, health = server["base"], server["health"]
    cap = health["max_upload_bytes"]
    before_files = _files_under(server["cwd"], server["tmp"])
    before_written, before_log = _write_bytes(server["pid"]), server["log"].stat().st_size

    driver.get(base + "/")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "picture-control").is_displayed())
    status = driver.find_element(By.ID, "status")

    def pick(path: Path, expect: str) -> str:
        driver.find_element(By.ID, "picture").send_keys(str(path))
        WebDriverWait(driver, WAIT_S).until(lambda d: expect in status.text and "error" in status.get_attribute("class"))
        text = status.text
        assert "\n" not in text.strip() and len(text) < 500, text  # one line
        assert not driver.find_elements(By.CSS_SELECTOR, "#results .card")
        return text

    # Over the server's cap: the page says so and sends nothing.
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(cap + 1024))
    pick(big, f"this server takes at most {cap / 2**20:.1f} MiB")
    # Not a picture at all (a text file): the server's 415, shown inline.
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    pick(notes, "is not a picture this server takes")
    driver.find_element(By.ID, "picture-remove").click()
    # A decompression bomb: a tiny PNG whose header claims 20000 x 20000 pixels.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(20_000, 20_000))
    assert len(bomb.read_bytes()) < 200
    assert "image_too_large" in pick(bomb, "cannot search with this picture")
    driver.find_element(By.ID, "picture-remove").click()

    # The API itself (what the page relies on), from the page's origin: status and a one-line error.
    post = """
        const [body, type, done] = arguments;
        const data = Array.isArray(body) ? new Uint8Array(body) : body;
        fetch('/api/search?k=5', {method: 'POST', headers: {'Content-Type': type}, body: data})
          .then(async r => done([r.status, await r.text()]), e => done([0, String(e)]));"""
    driver.set_script_timeout(WAIT_S)
    oversize = driver.execute_async_script(
        "const [n, done] = arguments; const b = new Uint8Array(n); b.set([137, 80, 78, 71]);"
        "fetch('/api/search', {method: 'POST', headers: {'Content-Type': 'image/png'}, body: b})"
        "  .then(async r => done([r.status, await r.text()]), e => done([0, String(e)]));", cap + 1)
    cases = {
        "oversize": (oversize, 413, "upload limit"),
        "text": (driver.execute_async_script(post, "hello", "text/plain"), 415, "not a picture"),
        "bomb": (driver.execute_async_script(post, list(bomb.read_bytes()), "image/png"), 400, "image_too_large"),
        # Under Pillow's own guard (2 x 89M pixels) but over the store's pixel cap: our check.
        "7000x7000": (driver.execute_async_script(post, list(_png_claiming(7000, 7000)), "image/png"), 400,
                      "max_image_pixels"),
    }
    for name, ((code, text), want, phrase) in cases.items():
        error = json.loads(text)["error"] if code else text
        assert code == want and phrase in error, (name, code, text)
        assert "\n" not in error and len(error) <= 500, (name, error)

    # Nothing was written: no new file in the server's working or temp dir, and (Linux) the
    # process wrote no bytes to storage beyond its log.
    assert _files_under(server["cwd"], server["tmp"]) == before_files
    after_written, after_log = _write_bytes(server["pid"]), server["log"].stat().st_size
    if before_written is not None and after_written is not None and after_log == before_log:
        assert after_written == before_written, f"ciea serve wrote {after_written - before_written} bytes"
