"""``ciea serve``'s API on a real server: a real ``ciea embed`` table (local Ray, Delta
corpus, LanceDB), the real :class:`pipelines.query.search.Searcher`, the real FastAPI app served by
uvicorn on a free loopback port, requests made with urllib (httpx, which FastAPI's
TestClient needs, is not a dependency).

Also checks what the page's overlay rests on: the ``patch_weights`` ``ciea embed`` stores
are the extractor's ``w``, recomputed here in-process from the checkpoint; and the picture
(``POST /api/search``) and "more like this" (``like=``) queries: results, one-line 4xx for
bad uploads, the byte cap enforced while reading, nothing written to disk.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import select
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import lancedb
import numpy as np
import pytest
import torch
from embed_helpers import make_checkpoint, run_embed, synthetic_records, write_corpus
from PIL import Image

from ciea_model import complementary_weights, load_checkpoint
from jobs import serve
from pipelines.query.search import Searcher
from pipelines.store.documents import expect_document, row_to_document
from pipelines.store.lance_tables import META_PATCH_GRID, PATCH_WEIGHTS, VectorTable
from pipelines.web import MAX_K, MAX_QUERY_CHARS
from pipelines.web.app import create_app
from pipelines.web.server import ServeConfig, build_app, resolve_allowed_hosts, serve_info

N_IMAGES, N_TEXTS = 40, 20
TABLE = "docs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn serving ``app`` on a loopback port from a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def request(base: str, path: str, *, method: str = "GET", headers: dict | None = None,
            params: dict | list | None = None) -> tuple[int, dict, bytes]:
    url = base + path + (("?" + urllib.parse.urlencode(params)) if params is not None else "")
    req = urllib.request.Request(url, method=method, headers=headers or {},
                                 data=b"{}" if method in ("POST", "PUT", "PATCH") else None)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_json(base: str, path: str, params: dict | list | None = None) -> tuple[int, dict]:
    status, headers, body = request(base, path, params=params)
    assert headers["content-type"].startswith("application/json"), (status, body[:200])
    return status, json.loads(body)


@pytest.fixture(scope="module")
def env(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("serve")
    records = synthetic_records(N_IMAGES, N_TEXTS, seed=5)
    root = tmp / "data"
    write_corpus(root, records)
    ckpt = make_checkpoint(tmp, [r["caption"] or r["text"] for r in records], seed=0)
    rc, summary = run_embed(tmp, root, ckpt, TABLE)
    assert rc == 0, summary
    db = str(root / "lancedb")
    return {"tmp": tmp, "root": root, "db": db, "ckpt": ckpt, "records": records, "summary": summary}


@pytest.fixture(scope="module")
def searcher(env):
    return Searcher.open(env["db"], TABLE)


@pytest.fixture(scope="module")
def server(env, searcher):
    cfg = ServeConfig.model_validate({"input": {"db": env["db"], "table": TABLE}})
    app, _ = build_app(cfg, searcher)
    with ThreadServer(app) as s:
        yield s


def _table_rows(env) -> dict[str, dict]:
    vt = VectorTable(env["db"], TABLE)
    return {r["doc_id"]: r for r in vt.dataset().to_table().to_pylist()}


# ---------------------------------------------------------------------------------------
# What the overlay shows: stored weights are the model's w
# ---------------------------------------------------------------------------------------


def test_stored_patch_weights_are_the_extractors_complementary_weights(env):
    vt = VectorTable(env["db"], TABLE)
    model, processor = load_checkpoint(env["ckpt"])
    assert vt.metadata()[META_PATCH_GRID] == "4x4" and model.patch_grid == (4, 4)
    schema = vt.dataset().schema
    assert str(schema.field(PATCH_WEIGHTS).type) == "fixed_size_list<item: float>[16]"
    rows = _table_rows(env)
    by_id = {r["doc_id"]: r for r in env["records"]}
    for r in rows.values():
        assert (r[PATCH_WEIGHTS] is None) == (r["modality"] == "text"), r["doc_id"]

    # Recomputed from the checkpoint straight from the definition: P = projector(vision(x)),
    # E = the LM's static embeddings of the caption-side tokens, w = 1 - max_t (1 + cos) / 2.
    image_ids = sorted(d for d, r in rows.items() if r["modality"] == "image")[:6]
    docs = [expect_document(row_to_document(by_id[d])) for d in image_ids]
    batch = processor.collate_documents(docs)
    with torch.inference_mode():
        patches = model.projector(model.vision(batch.image["pixel_values"]))
        embeds = model.text.embed_tokens(batch.image["input_ids"])
        w = complementary_weights(patches, embeds, batch.image["caption_mask"]).numpy()
    order = batch.image_index.tolist()
    stored = np.stack([np.asarray(rows[image_ids[i]][PATCH_WEIGHTS], np.float32) for i in order])
    np.testing.assert_allclose(stored, w, rtol=0, atol=1e-5)
    # Not vacuous: the weights differ between patches and between documents.
    assert np.ptp(w, axis=1).min() > 1e-4 and np.abs(w[0] - w[1]).max() > 1e-4


def test_encode_image_documents_returns_weights_without_changing_vectors(env):
    model, processor = load_checkpoint(env["ckpt"])
    images = [r for r in env["records"] if r["modality"] == "image"][:4]
    batch = processor.collate_documents([expect_document(row_to_document(r)) for r in images])
    with torch.inference_mode():
        plain = model.encode_documents(batch)
        with_w, w = model.encode_documents(batch, return_weights=True)
        doc, _, w2 = model.encode_image_documents(batch.image, return_image_only=True, return_weights=True)
        doc_only = model.encode_image_documents(batch.image)
    assert torch.equal(plain, with_w) and torch.equal(w, w2) and w.shape == (4, 16)
    assert torch.equal(doc, doc_only) and torch.equal(doc, plain)


# ---------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------


def test_health_reports_the_pinned_published_version(env, server):
    status, body = get_json(server.base, "/api/health")
    vt = VectorTable(env["db"], TABLE)
    assert status == 200 and body["status"] == "ok"
    assert body["table"] == TABLE and body["tag"] == "published"
    assert body["version"] == vt.published_version()
    assert body["model_id"] == env["summary"]["model_id"]
    assert body["rows"] == N_IMAGES + N_TEXTS == vt.count_rows()
    assert body["patch_grid"] == [4, 4]


def test_vector_search_returns_cards_with_thumbnails_scores_and_weights(env, server, searcher):
    rows = _table_rows(env)
    target = next(r for r in env["records"] if r["modality"] == "image" and r["caption"])
    status, body = get_json(server.base, "/api/search", {"q": target["caption"], "k": 8})
    assert status == 200
    hits = body["hits"]
    assert [h["rank"] for h in hits] == list(range(1, 9))
    assert body["patch_grid"] == [4, 4] and body["mode"] == "vector" and body["modality"] == "any"
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    # The API shows exactly what the Searcher found (same documents, same order, same scores).
    direct = searcher.search(target["caption"], k=8)
    assert [h["doc_id"] for h in hits] == [h.doc_id for h in direct]
    np.testing.assert_allclose(scores, [h.score for h in direct], atol=1e-6)
    images = [h for h in hits if h["modality"] == "image"]
    assert images, "a caption query should find image documents"
    for h in hits:
        row = rows[h["doc_id"]]
        if h["modality"] == "image":
            assert h["caption"] == row["caption"]
            assert h["thumbnail"].startswith("data:image/jpeg;base64,")
            raw = base64.b64decode(h["thumbnail"].split(",", 1)[1])
            assert raw == row["thumbnail"]
            assert Image.open(io.BytesIO(raw)).size[0] > 0
            np.testing.assert_allclose(h["patch_weights"], row[PATCH_WEIGHTS], atol=1e-4)
        else:
            assert h["thumbnail"] is None and h["patch_weights"] is None and h["text"] == row["text"]


@pytest.mark.parametrize("modality", ["image", "text"])
def test_modality_filter_keeps_only_that_modality(server, modality):
    status, body = get_json(server.base, "/api/search", {"q": "a red shape", "k": 30, "modality": modality})
    assert status == 200 and len(body["hits"]) > 0 and body["modality"] == modality
    assert {h["modality"] for h in body["hits"]} == {modality}
    want = N_IMAGES if modality == "image" else N_TEXTS
    assert len(body["hits"]) == min(30, want)


@pytest.mark.parametrize("mode", ["fts", "hybrid"])
def test_full_text_and_hybrid_modes_find_a_documents_own_words(env, server, mode):
    target = next(r for r in env["records"] if r["modality"] == "text")
    words = " ".join(target["text"].split()[:8])
    status, body = get_json(server.base, "/api/search", {"q": words, "k": 5, "mode": mode})
    assert status == 200 and body["mode"] == mode
    assert target["doc_id"] in [h["doc_id"] for h in body["hits"]]


BAD_REQUESTS = [
    ({}, "q", "q is empty"),
    ({"q": "   "}, "q", "q is empty"),
    ({"q": "x" * (MAX_QUERY_CHARS + 1)}, "q", f"at most {MAX_QUERY_CHARS}"),
    ({"q": "red\x00circle"}, "q", "control characters"),
    ({"q": "red", "k": "0"}, "k", f"from 1 to {MAX_K}"),
    ({"q": "red", "k": str(MAX_K + 1)}, "k", f"from 1 to {MAX_K}"),
    ({"q": "red", "k": "ten"}, "k", "whole number"),
    ({"q": "red", "k": "1e3"}, "k", "whole number"),
    ({"q": "red", "mode": "sql"}, "mode", "vector, fts, hybrid"),
    ({"q": "red", "modality": "video"}, "modality", "any, image, text"),
    ({"q": "red", "where": "1=1"}, "where", "unknown parameter"),
    ([("q", "red"), ("k", "3"), ("k", "4")], "k", "give it once"),
    ({"q": "red", "like": "img-000000000"}, "like", "both given"),
    ({"like": "  "}, "like", "like is empty"),
    ({"like": "img-000000000", "mode": "fts"}, "mode", "use mode=vector"),
    ({"like": "img-000000000", "mode": "hybrid"}, "mode", "use mode=vector"),
]


@pytest.mark.parametrize(("params", "param", "phrase"), BAD_REQUESTS)
def test_bad_input_gets_a_400_that_names_the_parameter_and_the_fix(server, params, param, phrase):
    status, body = get_json(server.base, "/api/search", params)
    assert status == 400, body
    assert body["param"] == param and phrase in body["error"]


HOSTILE_QUERIES = ["'; DROP TABLE docs; --", 'caption:"red', "(((", "red OR 1=1", "a* AND NOT b",
                   "\\", "über ☃ 円", "\" ' ` ; --", "NEAR(red blue)", "red^2 ~ {}[]"]


@pytest.mark.parametrize("mode", ["vector", "fts", "hybrid"])
def test_hostile_queries_never_cause_a_server_error(server, mode):
    for q in HOSTILE_QUERIES:
        status, body = get_json(server.base, "/api/search", {"q": q, "mode": mode, "k": 3})
        assert status in (200, 400), (q, status, body)
        assert ("hits" in body) if status == 200 else body["error"], (q, body)


def test_read_only_no_method_but_get_and_no_generated_pages(env, server):
    before = VectorTable(env["db"], TABLE).version()
    for method in ("PUT", "DELETE", "PATCH"):
        status, _, body = request(server.base, "/api/search", method=method, params={"q": "red"})
        assert status == 405 and "read-only" in json.loads(body)["error"], method
    for path in ("/api/health", "/"):  # POST only to /api/search (a picture query)
        status, _, body = request(server.base, path, method="POST")
        assert status == 405 and "read-only" in json.loads(body)["error"], path
    for path in ("/docs", "/redoc", "/openapi.json", "/api/nothing", "/static/../jobs/serve.py"):
        status, _, body = request(server.base, path)
        assert status == 404 and "error" in json.loads(body), path
    assert VectorTable(env["db"], TABLE).version() == before


def test_page_and_assets_are_served_with_a_strict_content_security_policy(server):
    status, headers, body = request(server.base, "/")
    html = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    for needle in ('id="search-form"', 'id="q"', 'id="mode"', 'id="modality"', 'id="k"', "/static/app.js"):
        assert needle in html, needle
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere: works offline
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        status, headers, _ = request(server.base, asset)
        assert status == 200 and kind in headers["content-type"], asset


def test_loopback_server_refuses_foreign_host_headers(env, searcher):
    # The default for a loopback host: a DNS-rebinding page gets nothing.
    cfg = ServeConfig.model_validate({"input": {"db": env["db"], "table": TABLE}})
    assert resolve_allowed_hosts(cfg.server)
    app, _ = build_app(cfg, searcher)
    with ThreadServer(app) as s:
        assert request(s.base, "/api/health")[0] == 200
        assert request(s.base, "/api/health", headers={"Host": f"localhost:{s.port}"})[0] == 200
        assert request(s.base, "/api/health", headers={"Host": "evil.example"})[0] == 400
    exposed = ServeConfig.model_validate({"input": {"db": env["db"]}, "server": {"host": "0.0.0.0"}})
    assert resolve_allowed_hosts(exposed.server) is None


# ---------------------------------------------------------------------------------------
# The CLI's errors (all before the server starts)
# ---------------------------------------------------------------------------------------


def _exit_message(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        serve.main(argv)
    return str(e.value.code)


def test_cli_errors_name_the_fix(env):
    port = str(free_port())
    assert "--db" in _exit_message(["--port", port])
    msg = _exit_message(["--db", env["db"], "--table", "nope", "--port", port])
    assert "no table 'nope'" in msg and TABLE in msg
    assert "not both" in _exit_message(["--db", env["db"], "--version", "1", "--tag", "x", "--port", port])
    assert "no tag 'nightly'" in _exit_message(["--db", env["db"], "--table", TABLE, "--tag", "nightly",
                                                "--port", port])
    assert "no version 999" in _exit_message(["--db", env["db"], "--table", TABLE, "--version", "999",
                                              "--port", port])
    assert "credential" in _exit_message(["--db", env["db"], "--storage-option", "AWS_SECRET_ACCESS_KEY=x",
                                          "--port", port])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        assert f"port {busy}" in _exit_message(["--db", env["db"], "--port", str(busy)])


def test_cli_help_mentions_loopback_and_exposure(capsys):
    with pytest.raises(SystemExit):
        serve.main(["--help"])
    out = capsys.readouterr().out
    assert "127.0.0.1" in out and "operator's choice" in out


def test_old_tables_without_weights_serve_without_an_overlay(env, tmp_path):
    """A table written before patch_weights existed: the page works, the overlay is off."""
    import pyarrow as pa

    src = lancedb.connect(env["db"]).open_table(TABLE).to_arrow().drop_columns([PATCH_WEIGHTS])
    db = lancedb.connect(str(tmp_path))
    t = db.create_table("old", src)
    meta = VectorTable(env["db"], TABLE).metadata()
    t.to_lance().update_metadata({k: v for k, v in meta.items() if k != META_PATCH_GRID})
    t.create_index("caption", config=lancedb.index.FTS(with_position=False))
    t.tags.create("published", t.version)
    cfg = ServeConfig.model_validate({"input": {"db": str(tmp_path), "table": "old"}})
    app, info = build_app(cfg)
    assert info.patch_grid is None and info.rows == src.num_rows
    with ThreadServer(app) as s:
        status, body = get_json(s.base, "/api/search", {"q": "a red shape", "k": 5})
    assert status == 200 and body["patch_grid"] is None and len(body["hits"]) == 5
    assert all(h["patch_weights"] is None for h in body["hits"])
    assert isinstance(src.schema.field("vector").type, pa.FixedSizeListType)


# ---------------------------------------------------------------------------------------
# Asking with a picture (POST) and "more like this" (like=)
# ---------------------------------------------------------------------------------------


def post_picture(base: str, data, *, params: dict | None = None, content_type: str | None = "image/png",
                 headers: dict | None = None) -> tuple[int, dict]:
    url = base + "/api/search" + (("?" + urllib.parse.urlencode(params)) if params else "")
    hdrs = dict(headers or {})
    if content_type is not None:
        hdrs["Content-Type"] = content_type
    req = urllib.request.Request(url, method="POST", data=data, headers=hdrs)
    if content_type is None:
        req.remove_header("Content-type")  # urllib adds application/x-www-form-urlencoded
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw, ctype = r.status, r.read(), r.headers["content-type"]
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers["content-type"]
    assert ctype.startswith("application/json"), (status, raw[:200])
    return status, json.loads(raw)


def _one_line_error(body: dict) -> str:
    msg = body["error"]
    assert "\n" not in msg and "Traceback" not in msg and " at 0x" not in msg, msg
    assert ".py" not in msg and "site-packages" not in msg and os.getcwd() not in msg, msg  # no internal path
    return msg


def _image_record(env, i: int = 0) -> dict:
    return [r for r in env["records"] if r["modality"] == "image" and r["caption"]][i]


def test_health_says_the_table_takes_pictures_and_the_upload_cap(server, searcher):
    status, body = get_json(server.base, "/api/health")
    assert status == 200 and body["accepts_pictures"] is True is searcher.model.config.uses_images
    assert body["max_upload_bytes"] == 8 * 1024 * 1024 and "image/png" in body["picture_types"]


def test_picture_with_its_caption_finds_its_own_document_first(env, server, searcher):
    target = _image_record(env, 3)
    status, body = post_picture(server.base, target["image"], params={"q": target["caption"], "k": 5})
    assert status == 200, body
    assert body["picture"] is True and body["query"] == target["caption"] and body["mode"] == "vector"
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]
    assert body["hits"][0]["doc_id"] == target["doc_id"]
    assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-3)  # the same input as the document's
    direct = searcher.search(target["caption"], image=target["image"], k=5)
    assert [h["doc_id"] for h in body["hits"]] == [h.doc_id for h in direct]


def test_picture_alone_and_with_a_modality_filter(env, server, searcher):
    target = _image_record(env, 1)
    status, body = post_picture(server.base, target["image"], params={"k": 7})
    assert status == 200, body
    assert body["query"] is None and len(body["hits"]) == 7
    direct = searcher.search(image=target["image"], k=7)
    assert [h["doc_id"] for h in body["hits"]] == [h.doc_id for h in direct]
    np.testing.assert_allclose([h["score"] for h in body["hits"]], [h.score for h in direct], atol=1e-5)
    status, body = post_picture(server.base, target["image"], params={"k": 5, "modality": "text"},
                                content_type="image/png; charset=binary")
    assert status == 200 and {h["modality"] for h in body["hits"]} == {"text"}


@pytest.mark.parametrize("data", [b"not a picture at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b""])
def test_a_bad_picture_gets_a_one_line_400(server, data):
    status, body = post_picture(server.base, data, params={"q": "red"})
    assert status == 400 and body["param"] == "picture", body
    msg = _one_line_error(body)
    assert ("empty" in msg) if not data else ("image_unrecognised" in msg or "image_decode_failed" in msg)


def test_a_decompression_bomb_gets_a_one_line_400(server):
    # A small PNG whose header claims 8000 x 8000 pixels: refused before a pixel is decoded.
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 1024 * 1024
    status, body = post_picture(server.base, buf.getvalue())
    assert status == 400 and "image_too_large" in _one_line_error(body), body


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", "image/svg+xml", None])
def test_a_body_that_is_not_a_picture_type_gets_a_415(env, server, content_type):
    status, body = post_picture(server.base, _image_record(env)["image"], content_type=content_type)
    assert status == 415 and "image/png" in _one_line_error(body), body


@pytest.mark.parametrize(("params", "param"), [({"like": "img-000000000"}, "like"), ({"mode": "fts"}, "mode"),
                                               ({"mode": "hybrid", "q": "red"}, "mode"), ({"k": "0"}, "k")])
def test_picture_parameters_are_checked_like_the_get_ones(env, server, params, param):
    status, body = post_picture(server.base, _image_record(env)["image"], params=params)
    assert status == 400 and body["param"] == param, body


SMALL_CAP = 64 * 1024


@pytest.fixture(scope="module")
def small_cap_server(env, searcher):
    cfg = ServeConfig.model_validate({"input": {"db": env["db"], "table": TABLE},
                                      "server": {"max_upload_mb": SMALL_CAP / (1024 * 1024)}})
    app, _ = build_app(cfg, searcher)
    with ThreadServer(app) as s:
        yield s


def _chunked_post(port: int, path: str, chunk: bytes, total: int) -> tuple[int, bytes]:
    """POSTs ``total`` bytes as chunked transfer encoding (no Content-Length: the server
    can only stop by counting), stopping as soon as the server answers; returns
    ``(bytes sent, response)``."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n").encode())
        try:
            while sent < total:
                if select.select([sock], [], [], 0.002)[0]:
                    break  # the server has answered: stop sending, as a browser does
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = b""
        try:
            while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
                part = sock.recv(65536)
                if not part:
                    break
                response += part
        except ConnectionResetError:
            pass
    return sent, response


def test_an_upload_over_the_cap_gets_a_413_and_is_not_read_to_its_end(small_cap_server):
    base = small_cap_server.base
    status, body = get_json(base, "/api/health")
    assert body["max_upload_bytes"] == SMALL_CAP
    # Declared too large: refused from the header, before the body is read.
    status, body = post_picture(base, b"\0" * (SMALL_CAP + 1))
    assert status == 413 and "max_upload_mb" in _one_line_error(body), body
    # Not declared (chunked): the server counts while reading and stops past the cap.
    total = 256 * 1024 * 1024
    sent, response = _chunked_post(small_cap_server.port, "/api/search", b"\0" * 65536, total)
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), response[:300]
    assert "max_upload_mb" in _one_line_error(json.loads(payload))
    assert sent < total // 4, sent  # what the sender got into socket buffers, not the whole body


def test_the_app_reads_no_byte_more_than_the_cap_plus_one_chunk(env, searcher):
    """At the ASGI level the count is exact: the app asks for the body chunk by chunk and
    stops as soon as it has more than the cap."""
    app = create_app(searcher, serve_info(searcher), max_upload_bytes=SMALL_CAP)
    chunk = 4096
    given = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal given
        if given >= 64 * SMALL_CAP:
            return {"type": "http.disconnect"}
        given += chunk
        return {"type": "http.request", "body": b"\0" * chunk, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/search", "raw_path": b"/api/search", "query_string": b"k=3", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"image/png")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert SMALL_CAP < given <= SMALL_CAP + chunk, given


def test_an_upload_writes_nothing_to_disk(env, server, monkeypatch, tmp_path):
    # The server runs in this process: a private temp dir and cwd must stay empty through
    # uploads (a multipart parser would spool a large part to a temporary file).
    scratch, cwd = tmp_path / "tmp", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.chdir(cwd)
    buf = io.BytesIO()
    Image.open(io.BytesIO(_image_record(env)["image"])).resize((1024, 1024)).save(buf, format="BMP")
    assert len(buf.getvalue()) > 1024 * 1024  # big enough to be spooled if anything spooled
    for data, ctype in ((buf.getvalue(), "image/bmp"), (_image_record(env)["image"], "image/png"),
                        (b"garbage", "image/png")):
        status, body = post_picture(server.base, data, params={"q": "a red shape", "k": 3}, content_type=ctype)
        assert status in (200, 400), body
    assert status == 400
    assert os.listdir(scratch) == [] and os.listdir(cwd) == []


def test_more_like_this_leaves_the_document_out(env, server, searcher):
    target = _image_record(env, 2)
    status, body = get_json(server.base, "/api/search", {"like": target["doc_id"], "k": 6})
    assert status == 200, body
    assert body["like"] == target["doc_id"] and body["query"] is None and body["picture"] is False
    ids = [h["doc_id"] for h in body["hits"]]
    assert len(ids) == 6 and target["doc_id"] not in ids
    assert [h["rank"] for h in body["hits"]] == list(range(1, 7))
    assert ids == [h.doc_id for h in searcher.search(like=target["doc_id"], k=6)]
    status, body = get_json(server.base, "/api/search", {"like": target["doc_id"], "k": 50, "modality": "image"})
    assert status == 200 and len(body["hits"]) == N_IMAGES - 1
    assert {h["modality"] for h in body["hits"]} == {"image"}


def test_more_like_an_unknown_document_is_a_404(server):
    status, body = get_json(server.base, "/api/search", {"like": "no-such-doc"})
    assert status == 404 and body["param"] == "like" and "no-such-doc" in body["error"], body
    _one_line_error(body)
    status, body = get_json(server.base, "/api/search", {"like": "x'; DROP TABLE docs; --"})
    assert status == 404, body


def test_picture_and_like_routes_keep_the_host_check_and_headers(env, server):
    image = _image_record(env)["image"]
    # build_app's default for a loopback server: foreign Host names get nothing.
    req = urllib.request.Request(server.base + "/api/search?k=2", method="POST", data=image,
                                 headers={"Content-Type": "image/png", "Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=60)
    assert refused.value.code == 400 and b"hits" not in refused.value.read()
    assert request(server.base, "/api/search", params={"like": "x"}, headers={"Host": "evil.example"})[0] == 400
    req = urllib.request.Request(server.base + "/api/search?k=2", method="POST", data=image,
                                 headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
    status, headers, _ = request(server.base, "/api/search", params={"like": "no-such-doc"})
    assert status == 404 and "default-src 'none'" in headers["content-security-policy"]


def test_the_upload_cap_setting_is_checked_against_the_store_cap(env):
    from pipelines.store.images import MAX_IMAGE_BYTES

    cfg = ServeConfig.model_validate({"input": {"db": env["db"]}, "server": {"max_upload_mb": 2}})
    assert cfg.server.max_upload_bytes == 2 * 1024 * 1024 <= MAX_IMAGE_BYTES
    for bad in (0, -1, MAX_IMAGE_BYTES / (1024 * 1024) + 1):
        with pytest.raises(ValueError, match="max_upload_mb"):
            ServeConfig.model_validate({"input": {"db": env["db"]}, "server": {"max_upload_mb": bad}})
