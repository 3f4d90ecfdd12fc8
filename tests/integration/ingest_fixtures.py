"""Small source fixtures written in the exact released formats, plus bad inputs."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from webqa_shaped import write_imgs_tsv


def image_bytes(color: tuple[int, int, int], size: tuple[int, int] = (12, 8), fmt: str = "PNG",
                noise: bool = False) -> bytes:
    img = Image.new("RGB", size, color)
    if noise:
        import numpy as np

        rng = np.random.default_rng(sum(color))
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    out = io.BytesIO()
    img.save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (a decompression bomb's signature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    data = image_bytes((1, 2, 3), size=(64, 64), noise=True)
    return data[: len(data) // 2]


def jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ---------------------------------------------------------------------------------------
# WebQA (UniVL-DR release layout)
# ---------------------------------------------------------------------------------------

WEBQA_TEXTS = {
    "d5bbc6d80dba11ecb1e81171463288e9": "The Eiffel Tower is 330 metres tall.",
    "d5bbc8b80dba11ecb1e81171463288e9": "Café de Flore is in Saint-Germain-des-Prés.",  # NFC-relevant é
    "d5bbca400dba11ecb1e81171463288e9": "Tulips bloom in April in the Netherlands.",
}
WEBQA_IMAGES = {30000001: ((200, 30, 30), "A red barn in a field"),
                30000002: ((30, 200, 30), "Green hills of Wales"),
                30000003: ((30, 30, 200), "Blue door, Chefchaouen")}


def write_webqa(root: Path) -> dict:
    """all_docs.json, all_imgs.json, imgs.tsv (+ an image no caption refers to),
    imgs.lineidx.new, train/dev/test.json, test_qrels.txt."""
    root.mkdir(parents=True, exist_ok=True)
    jsonl(root / "all_docs.json", [
        {"snippet_id": k, "fact": v, "title": f"title {i}", "url": f"https://example.org/{i}"}
        for i, (k, v) in enumerate(WEBQA_TEXTS.items())])
    jsonl(root / "all_imgs.json", [
        {"image_id": k, "caption": cap, "title": f"img {k}"} for k, (_, cap) in WEBQA_IMAGES.items()])
    images = {k: image_bytes(color, fmt="JPEG") for k, (color, _) in WEBQA_IMAGES.items()}
    # The tsv holds the images in a different order than all_imgs.json, plus one unused.
    write_imgs_tsv(root, [(k, images.get(k) or image_bytes((9, 9, 9), fmt="JPEG"))
                          for k in [30000003, 99999999, 30000001, 30000002]])
    d = list(WEBQA_TEXTS)
    queries = {
        "train": [{"qid": "q-train-1", "Q": "How tall is the Eiffel Tower?", "A": ["330 metres"],
                   "topic": "landmarks", "Qcate": "text", "img_posFacts": [], "img_negFacts": [30000002],
                   "txt_posFacts": [d[0]], "txt_negFacts": [d[2]]},
                  {"qid": "q-train-2", "Q": "What colour is the barn?", "A": ["red"], "topic": "farms",
                   "Qcate": "color", "img_posFacts": [30000001], "img_negFacts": [],
                   "txt_posFacts": [], "txt_negFacts": []}],
        "dev": [{"qid": "q-dev-1", "Q": "When do tulips bloom?", "A": ["April"], "img_posFacts": [],
                 "img_negFacts": [], "txt_posFacts": [d[2]], "txt_negFacts": []}],
        "test": [{"qid": "q-test-1", "Q": "Which door is blue?", "A": ["Chefchaouen"],
                  "img_posFacts": [30000003], "img_negFacts": [], "txt_posFacts": [], "txt_negFacts": []}],
    }
    for split, rows in queries.items():
        jsonl(root / f"{split}.json", rows)
    (root / "test_qrels.txt").write_text("q-test-1\t30000003\t1\n")
    return {"images": images, "queries": queries}


# ---------------------------------------------------------------------------------------
# EDIS
# ---------------------------------------------------------------------------------------


def write_edis(root: Path) -> dict:
    """candidates_full.json (a JSON array), images/, train/dev/test.json (JSON arrays)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    cands = []
    images = {}
    for i, (color, headline) in enumerate([((250, 0, 0), "Storm hits the coast"),
                                           ((0, 250, 0), "Parliament votes on budget"),
                                           ((0, 0, 250), "Local team wins final")]):
        name = f"{i:08d}_0463{i}_01.jpg"
        images[str(i)] = image_bytes(color, fmt="JPEG")
        (root / "images" / name).write_bytes(images[str(i)])
        cands.append({"id": i, "contents": headline, "image": name})
    (root / "candidates_full.json").write_text(json.dumps(cands))
    q = lambda qid, text, scores: {"id": qid, "query": text, "candidates": [  # noqa: E731
        {"candidate_id": c, "image": cands[c]["image"], "headline": cands[c]["contents"], "score": s}
        for c, s in scores]}
    splits = {"train": [q(100, "storm damage on the coast", [(0, 3), (1, 1)])],
              "dev": [q(200, "budget vote in parliament", [(1, 3), (2, 2)])],
              "test": [q(300, "team celebrates winning the final", [(2, 3), (0, 1)])]}
    for split, rows in splits.items():
        (root / f"{split}.json").write_text(json.dumps(rows))
    return {"images": images, "splits": splits}


# ---------------------------------------------------------------------------------------
# Manifests and folders
# ---------------------------------------------------------------------------------------


def write_manifest_jsonl(root: Path, n: int = 10) -> list[dict]:
    """``n`` documents: even ones image (relative path), odd ones text, free metadata."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            (root / "img" / f"{i}.png").write_bytes(image_bytes((i * 20, 100, 50)))
            rows.append({"doc_id": f"m{i}", "caption": f"picture {i}", "image": f"img/{i}.png",
                         "lang": "en", "rank": i})
        else:
            rows.append({"doc_id": f"m{i}", "text": f"document number {i}", "lang": "en", "rank": i})
    jsonl(root / "docs.jsonl", rows)
    return rows


def write_manifest_parquet(path: Path) -> pa.Table:
    table = pa.table({
        "doc_id": pa.array([1, 2, 3], pa.int64()),
        "text": ["first text", None, "third text"],
        "caption": [None, "an inline image", None],
        "image": pa.array([None, image_bytes((5, 6, 7)), None], pa.binary()),
        "shelf": ["a", "b", "c"],
    })
    pq.write_table(table, path, row_group_size=2)
    return table


def write_folder(root: Path) -> dict[str, bytes]:
    (root / "cats").mkdir(parents=True, exist_ok=True)
    files = {"cats/001": image_bytes((10, 10, 10)), "cats/002": image_bytes((20, 20, 20), fmt="JPEG"),
             "dog": image_bytes((30, 30, 30))}
    (root / "cats" / "001.png").write_bytes(files["cats/001"])
    (root / "cats" / "001.txt").write_text("a black cat\n", encoding="utf-8")
    (root / "cats" / "002.jpg").write_bytes(files["cats/002"])
    (root / "cats" / "002.txt").write_text("a grey cat", encoding="utf-8")
    (root / "dog.png").write_bytes(files["dog"])  # no sidecar: empty caption
    (root / "README.md").write_text("not a document")
    return files


def write_bad_manifest(root: Path) -> dict[str, str]:
    """One JSONL manifest with a good record and each bad input of issue 3.

    Returns:
        doc_id (or record marker) -> expected quarantine reason.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    (root / "truncated.png").write_bytes(truncated_png())
    (root / "bomb.png").write_bytes(png_header_only(30000, 30000))
    (root / "ok.png").write_bytes(image_bytes((1, 100, 200)))
    good = [{"doc_id": "good-text", "text": "a perfectly fine text"},
            {"doc_id": "good-image", "caption": "fine", "image": "ok.png"},
            {"doc_id": "dup", "text": "first of two records with this id"}]
    bad = [
        ({"doc_id": "corrupt", "caption": "x", "image": "corrupt.jpg"}, "image_unrecognised"),
        ({"doc_id": "truncated", "caption": "x", "image": "truncated.png"}, "image_decode_failed"),
        ({"doc_id": "bomb", "caption": "x", "image": "bomb.png"}, "image_too_large"),
        ({"doc_id": "empty"}, "missing_content"),
        ({"doc_id": "wrongtype", "text": 12345}, "wrong_type"),
        ({"doc_id": "dup", "text": "second record with the same id"}, "duplicate_doc_id"),
        ({"doc_id": "huge", "text": "x" * (10 * 1024 * 1024)}, "text_too_long"),
        ({"doc_id": "noimage", "caption": "c", "image": "does-not-exist.png"}, "image_missing"),
    ]
    lines = [json.dumps(r).encode() for r in good]
    expected = {}
    for row, reason in bad:
        lines.append(json.dumps(row).encode())
        expected[row["doc_id"]] = reason
    # Non-UTF-8 text: Latin-1 bytes inside an otherwise valid JSON line.
    lines.append(b'{"doc_id": "latin1", "text": "caf\xe9 cr\xe8me"}')
    expected["latin1"] = "not_utf8"
    lines.append(b'{"doc_id": "broken", "text": ')
    expected["broken"] = "bad_json"
    (root / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return expected
