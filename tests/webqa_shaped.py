"""A corpus in WebQA's own release layout (``all_docs.json``, ``all_imgs.json``, ``imgs.tsv``
+ ``imgs.lineidx.new``, ``<split>.json``) with the shapes its queries take, which the
synthetic corpus never produces: no ``target_doc_id`` anywhere, image-answer queries with
two image positives (≈ 44 % of WebQA's), text-answer queries with several text positives
(99.5 % have two or more), one image-answer query with a single positive, and negative facts
beside the positives.

Every caption is two words of its own, so a test can tell whose caption tokens ``q_comp``
lost; every image query also asks for one word no caption holds ("night"), so its ``q_comp``
is never empty.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image

COLOURS = ["red", "white", "green", "golden", "black", "silver", "purple", "orange"]
THINGS = ["barn", "lighthouse", "bridge", "temple", "tower", "fountain", "windmill", "castle"]
#: image_id → caption: "<colour> <thing>", all words distinct.
IMAGES = {30000000 + i: f"{c} {t}" for i, (c, t) in enumerate(zip(COLOURS, THINGS))}
#: snippet_id → fact.
TEXTS = {f"d{i:02d}": f"fact number {i} about the history of place {i}" for i in range(14)}
IMAGE_IDS, TEXT_IDS = list(IMAGES), list(TEXTS)


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buf, format="JPEG")
    return buf.getvalue()


def _image_query(qid: str, positives: list[int]) -> dict:
    words = " ".join(IMAGES[p] for p in positives)
    return {"qid": qid, "Q": f"what do the {words} look like at night", "A": ["dark"], "Qcate": "color",
            "img_posFacts": positives, "img_negFacts": [IMAGE_IDS[-1]], "txt_posFacts": [], "txt_negFacts": [TEXT_IDS[-1]]}


def _text_query(qid: str, positives: list[str]) -> dict:
    return {"qid": qid, "Q": f"tell me the history of {qid}", "A": ["old"], "Qcate": "text", "img_posFacts": [],
            "img_negFacts": [IMAGE_IDS[-1]], "txt_posFacts": positives, "txt_negFacts": [TEXT_IDS[-1]]}


#: The training queries: four with two image positives, two with a single image positive,
#: four text-answer queries with three text positives each.
TRAIN = ([_image_query(f"img2-{k}", IMAGE_IDS[2 * k: 2 * k + 2]) for k in range(3)]
         + [_image_query("img2-3", [IMAGE_IDS[6], IMAGE_IDS[0]])]
         + [_image_query(f"img1-{k}", [IMAGE_IDS[k + 4]]) for k in range(2)]
         + [_text_query(f"txt3-{k}", TEXT_IDS[3 * k: 3 * k + 3]) for k in range(4)])
DEV = [_image_query("dev-img2", IMAGE_IDS[1:3]), _text_query("dev-txt2", TEXT_IDS[12:14])]
TEST = [_image_query("test-img1", [IMAGE_IDS[3]])]


def write_imgs_tsv(root: Path, images: list[tuple[int, bytes]]) -> None:
    """WebQA's ``imgs.tsv`` (``image_id \\t base64(JPEG)`` lines, in the given order) and its
    ``imgs.lineidx.new`` (``image_id \\t byte offset`` of each line)."""
    lines, index, offset = [], [], 0
    for k, data in images:
        line = f"{k}\t{base64.b64encode(data).decode()}\n".encode()
        index.append(f"{k}\t{offset}\n")
        lines.append(line)
        offset += len(line)
    (root / "imgs.tsv").write_bytes(b"".join(lines))
    (root / "imgs.lineidx.new").write_text("".join(index))


def write_webqa_shaped(root: Path) -> Path:
    """Writes the corpus under ``root`` in the release layout; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)

    def jsonl(name: str, rows: list[dict]) -> None:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("all_docs.json", [{"snippet_id": k, "fact": v, "title": k} for k, v in TEXTS.items()])
    jsonl("all_imgs.json", [{"image_id": k, "caption": v, "title": v} for k, v in IMAGES.items()])
    write_imgs_tsv(root, [(k, _jpeg(i)) for i, k in enumerate(IMAGES)])
    for split, rows in (("train", TRAIN), ("dev", DEV), ("test", TEST)):
        jsonl(f"{split}.json", rows)
    return root


def positives(query: dict) -> list[str]:
    """A query's positive doc ids as ingest stores them (image ids as strings)."""
    return [str(p) for p in query["img_posFacts"]] + list(query["txt_posFacts"])
