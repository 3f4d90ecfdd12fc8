"""The store's one rows → Document converter (``pipelines.store.documents``) on the shapes real
rows take: Delta batches (plain and view types), generator records, joined training slots;
a missing caption, a null image, an image given as a path or ``file://`` URI, a file that is
gone, bytes that are no image, and absurd values. Every row comes out as a Document or as a
``Rejected`` with its reason; none raises, none goes missing."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ciea_model.config import CLIP_MEAN, CLIP_STD
from ciea_model.processor import Document, ImageTransform
from pipelines.store import documents as D
from pipelines.store import schema as S


def _png(color=(255, 0, 0), size=(12, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


RED, BLUE = _png((255, 0, 0)), _png((0, 0, 255), (20, 30))
#: The columns a Delta read hands over (``DOCUMENTS_SCHEMA``'s types), or the view types a
#: merge writes.
PLAIN = pa.schema([pa.field(c, S.DOCUMENTS_SCHEMA.field(c).type) for c in D.DOCUMENT_COLUMNS])
VIEWS = pa.schema([pa.field(c, pa.binary_view() if c == S.IMAGE else pa.string_view()) for c in D.DOCUMENT_COLUMNS])


def _row(doc_id="d", modality="image", text=None, caption=None, image=None, image_uri=None) -> dict:
    return {S.DOC_ID: doc_id, S.MODALITY: modality, S.TEXT: text, S.CAPTION: caption, S.IMAGE: image,
            S.IMAGE_URI: image_uri}


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "blue.png").write_bytes(BLUE)
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    return tmp_path


def _real_rows(files) -> list[dict]:
    """One row of every shape a ``corpus/documents`` version holds, good and bad."""
    return [
        _row("i-inline", caption="a red square", image=RED),
        _row("i-path", caption="from a file", image_uri=str(files / "blue.png")),
        _row("i-uri", caption=None, image_uri=(files / "blue.png").as_uri()),  # caption missing
        _row("t-plain", "text", text="red things are warm"),
        _row("t-empty", "text"),  # text and caption null: an empty text document
        _row("t-with-uri", "text", text="ignores images", image_uri=str(files / "gone.png")),
        _row("i-null"),  # image document with neither bytes nor a URI
        _row("i-gone", image_uri=str(files / "gone.png")),
        _row("i-junk", image=b"not a png at all"),
        _row("i-empty-bytes", image=b"", image_uri=str(files / "blue.png")),
    ]


@pytest.mark.parametrize("schema", [PLAIN, VIEWS], ids=["plain", "view"])
def test_a_delta_batch_of_every_shape(files, schema):
    rows = _real_rows(files)
    table = pa.Table.from_pylist(rows, schema=schema)
    docs, rejected = D.batch_to_documents(table)
    assert [d.doc_id for d in docs] == ["i-inline", "i-path", "i-uri", "t-plain", "t-empty", "t-with-uri",
                                        "i-junk", "i-empty-bytes"]
    by_id = {d.doc_id: d for d in docs}
    assert by_id["i-inline"] == Document("i-inline", "image", caption="a red square", image=RED)
    assert by_id["i-path"].image == BLUE and by_id["i-uri"].image == BLUE and by_id["i-empty-bytes"].image == BLUE
    assert by_id["i-uri"].caption == "" and by_id["t-empty"] == Document("t-empty", "text")
    # A text document carries no image: its image_uri is not even read.
    assert by_id["t-with-uri"] == Document("t-with-uri", "text", text="ignores images")
    # Without a transform the bytes stay encoded: undecodable bytes pass (decoded later).
    assert by_id["i-junk"].image == b"not a png at all"
    assert [(r.doc_id, r.reason) for r in rejected] == [("i-null", D.NO_IMAGE), ("i-gone", D.IMAGE_UNREADABLE)]
    assert "gone.png" in str(rejected[1]) and "neither image bytes nor image_uri" in str(rejected[0])
    assert len(docs) + len(rejected) == len(rows)  # nothing goes missing


def test_the_image_transform_runs_once_here_and_undecodable_bytes_are_rejected(files):
    transform = ImageTransform(16, CLIP_MEAN, CLIP_STD)
    table = pa.Table.from_pylist(_real_rows(files), schema=PLAIN)
    docs, rejected = D.batch_to_documents(table, image_transform=transform)
    images = [d for d in docs if d.modality == "image"]
    assert {d.doc_id for d in images} == {"i-inline", "i-path", "i-uri", "i-empty-bytes"}
    for d in images:
        assert isinstance(d.image, torch.Tensor) and d.image.shape == (3, 16, 16)
    torch.testing.assert_close(images[0].image, transform(RED))
    assert all(d.image is None for d in docs if d.modality == "text")
    junk = next(r for r in rejected if r.doc_id == "i-junk")
    assert junk.reason == D.IMAGE_UNDECODABLE and "UnidentifiedImageError" in junk.detail


def test_storage_options_reach_the_reader_of_image_uris(monkeypatch):
    seen = []

    def read_bytes(uri, options=None):
        seen.append((uri, options))
        return RED

    monkeypatch.setattr(D.storage, "read_bytes", read_bytes)
    options = {"aws_endpoint_url": "http://127.0.0.1:9000", "aws_region": "us-east-1"}
    doc = D.row_to_document(_row(image_uri="s3://bucket/a.png"), storage_options=options)
    assert doc == Document("d", "image", image=RED) and seen == [("s3://bucket/a.png", options)]
    D.row_to_document(_row(image_uri="/local/a.png"))
    assert seen[-1] == ("/local/a.png", None)


@pytest.mark.parametrize(("row", "reason", "detail"), [
    (_row(None, image=RED), D.NO_DOC_ID, "None"),
    (_row("", image=RED), D.NO_DOC_ID, "''"),
    (_row(modality=None, image=RED), D.BAD_MODALITY, "None"),
    (_row(modality="IMAGE", image=RED), D.BAD_MODALITY, "'IMAGE'"),
    (_row(modality="video", image=RED), D.BAD_MODALITY, "'video'"),
    (_row(modality="text", text=123), D.BAD_FIELD, "text is a int"),
    (_row(caption=["a", "list"], image=RED), D.BAD_FIELD, "caption is a list"),
    (_row(image="pictures/a.png"), D.BAD_FIELD, "image is a str"),
    (_row(image=3.5), D.BAD_FIELD, "image is a float"),
    (_row(image_uri=42), D.BAD_FIELD, "image_uri is a int"),
    (_row(image=b"", image_uri=""), D.NO_IMAGE, "neither"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_absurd_values_are_rejected_with_the_reason(row, reason, detail):
    got = D.row_to_document(row)
    assert isinstance(got, D.Rejected) and got.reason == reason and detail in got.detail, got
    with pytest.raises(D.DocumentError, match=r"cannot be read: .*; ") as e:
        D.expect_document(got)
    assert e.value.rejected == [got] and D.FIXES[reason] in str(e.value)


def test_odd_but_usable_values_become_documents():
    # An integer id (a generator's) reads as a string; a huge caption is kept whole; a
    # record without the optional keys reads them as null; a decoded image passes as it is.
    assert D.row_to_document(_row(7, image=RED)).doc_id == "7"
    long = "word " * 20000
    assert D.row_to_document(_row(caption=long, image=RED)).caption == long
    assert D.row_to_document({"doc_id": "t", "modality": "text"}) == Document("t", "text")
    pil = Image.new("RGB", (4, 4))
    assert D.row_to_document(_row(image=pil)).image is pil


def test_converted_require_and_a_batch_without_the_required_columns():
    table = pa.Table.from_pylist([_row("a", image=RED), _row("b"), _row("c")], schema=PLAIN)
    with pytest.raises(D.DocumentError, match=r"document 'b' cannot be read: no_image: .*and 1 more rows"):
        D.batch_to_documents(table).require()
    assert D.batch_to_documents(table.slice(0, 1)).require() == [Document("a", "image", image=RED)]
    assert D.batch_to_documents(table.slice(0, 0)) == ([], [])
    with pytest.raises(ValueError, match=r"lacks the columns \['modality'\] \(it has \['doc_id', 'text'\]\)"):
        D.batch_to_documents(pa.table({"doc_id": ["a"], "text": ["x"]}))


def test_slots_of_a_joined_row(files):
    cols = {**{D.slot_column("pos", c): v for c, v in _row("i1", caption="a red square", image=RED).items()},
            **{D.slot_column("neg0", c): v for c, v in _row("i9", image_uri=str(files / "gone.png")).items()},
            # a mined negative drawn but gone from the corpus: the left outer join found nothing
            **{D.slot_column("neg1", c): v for c, v in _row("t9", None).items()},
            "qid": "q"}
    assert D.slot_column("pos", S.DOC_ID) == "pos_id" and D.slot_column("pos", S.IMAGE_URI) == "pos_image_uri"
    assert D.slot_to_document(cols, "pos") == Document("i1", "image", caption="a red square", image=RED)
    assert D.slot_to_document(cols, "neg0").reason == D.IMAGE_UNREADABLE
    assert D.slot_to_document(cols, "neg1") is None  # empty slot, not a rejected row
    assert D.slot_to_document({**cols, "neg1_id": None}, "neg1") is None  # no draw


def test_training_rows_skip_empty_slots_and_stop_on_an_unreadable_document(files):
    from pipelines.train.dataset import rows_to_examples

    base = {"qid": ["q"], "query": ["red"], "relevant_ids": [["i1"]]}
    for slot, row in (("pos", _row("i1", caption="a red square", image=RED)), ("neg0", _row("t2", "text", text="x")),
                      ("neg1", _row("gone", None))):
        base.update({D.slot_column(slot, c): [v] for c, v in row.items()})
    (ex,) = rows_to_examples(base)
    assert ex.positive.image == RED and ex.negatives == (Document("t2", "text", text="x"),)
    bad = {**base, "pos_image": [None], "pos_image_uri": [str(files / "gone.png")]}
    with pytest.raises(D.DocumentError, match=r"'i1' cannot be read: image_unreadable: .*gone\.png"):
        rows_to_examples(bad)


# ---- the row and the batch forms agree -----------------------------------------------------
def _magic_transform(image):
    """A stand-in decoder: PNG bytes → their length, anything else fails (as PIL would)."""
    if not bytes(image).startswith(b"\x89PNG"):
        raise ValueError("not a PNG")
    return len(image)


_IDS = st.one_of(st.none(), st.just(""), st.text(min_size=1, max_size=6))
_MODALITIES = st.one_of(st.none(), st.sampled_from(["text", "image", "Image", "", "video"]))
_TEXTS = st.one_of(st.none(), st.text(max_size=12))
_IMAGES = st.one_of(st.none(), st.just(b""), st.just(RED), st.binary(max_size=10))
_URIS = st.one_of(st.none(), st.just(""), st.sampled_from(["blue.png", "gone.png", "junk.png"]))


@settings(max_examples=80, deadline=None)
@given(data=st.data(), views=st.booleans(), transform=st.booleans())
def test_the_row_and_the_batch_forms_agree(tmp_path_factory, data, views, transform):
    where = tmp_path_factory.getbasetemp() / "agree"
    if not where.exists():
        where.mkdir()
        (where / "blue.png").write_bytes(BLUE)
        (where / "junk.png").write_bytes(b"junk")
    n = data.draw(st.integers(0, 8))
    rows = [_row(data.draw(_IDS), data.draw(_MODALITIES), data.draw(_TEXTS), data.draw(_TEXTS),
                 data.draw(_IMAGES), (lambda u: str(where / u) if u else u)(data.draw(_URIS))) for _ in range(n)]
    kwargs = {"image_transform": _magic_transform if transform else None}
    table = pa.Table.from_pylist(rows, schema=VIEWS if views else PLAIN)
    one_by_one = [D.row_to_document(r, **kwargs) for r in rows]
    for batch in (table, table.to_batches()[0] if table.num_rows else table,
                  {c: [r[c] for r in rows] for c in D.DOCUMENT_COLUMNS}):
        docs, rejected = D.batch_to_documents(batch, **kwargs)
        assert docs == [x for x in one_by_one if isinstance(x, Document)]
        assert rejected == [x for x in one_by_one if isinstance(x, D.Rejected)]
    # Every row is accounted for, and only rows that cannot be used are rejected.
    for row, got in zip(rows, one_by_one):
        usable = bool(row[S.DOC_ID]) and row[S.MODALITY] in S.MODALITIES
        if usable and row[S.MODALITY] == "image":
            raw = row[S.IMAGE] or (BLUE if (row[S.IMAGE_URI] or "").endswith("blue.png") else
                                   b"junk" if (row[S.IMAGE_URI] or "").endswith("junk.png") else None)
            usable = raw is not None and (not transform or raw.startswith(b"\x89PNG"))
        assert isinstance(got, Document) == usable, (row, got)
