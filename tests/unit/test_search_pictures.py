"""Picture queries before any table is touched: which models take a picture, and the
picture rule (the one ingest applies) on what a user may hand over. The searches themselves
run on a real table in tests/integration/test_search.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ciea_model.inference import encode_documents
from ciea_model.processor import Document
from pipelines.query.search import Searcher, SearchError


def _searcher(model, processor) -> Searcher:
    """A Searcher around a real tiny model, without a table: only the encoding is used."""
    s = Searcher.__new__(Searcher)
    s.model, s.processor, s.device, s.name = model, processor, "cpu", "docs"
    return s


def _png(mode: str = "RGB", size=(20, 12)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (200, 30, 30, 128)[: len(mode)]).save(out, format="PNG")
    return out.getvalue()


def test_a_text_only_model_refuses_a_picture_in_one_line(make_model):
    with pytest.raises(SearchError, match="'text-only' model, which encodes no image") as e:
        _searcher(*make_model("text-only")).encode_pictures([_png()], ["red"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("variant", ["ciea", "marvel", "ciea-no-cie"])
def test_a_picture_is_encoded_as_the_image_document_it_would_be(make_model, variant):
    model, processor = make_model(variant)
    got = _searcher(model, processor).encode_pictures([_png(), _png()], ["a red thing", None])
    expected = encode_documents(model, processor, [Document("a", "image", caption="a red thing", image=_png()),
                                                   Document("b", "image", caption="", image=_png())])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.dtype == np.float32 and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_a_picture_with_alpha_is_normalised_as_ingest_normalises_it(make_model):
    """RGBA is composited on white, as ingest stores it: the same vector as that RGB picture."""
    model, processor = make_model("ciea")
    rgba = _png("RGBA")
    white = Image.new("RGB", (20, 12), (255, 255, 255))
    white.paste(Image.open(io.BytesIO(rgba)).convert("RGBA"), mask=Image.open(io.BytesIO(rgba)).getchannel("A"))
    out = io.BytesIO()
    white.save(out, format="PNG")
    s = _searcher(model, processor)
    np.testing.assert_allclose(s.encode_pictures([rgba]), s.encode_pictures([out.getvalue()]), atol=1e-6)


@pytest.mark.parametrize("picture, match", [
    (b"", "image_unrecognised"),
    (b"GIF89a\x00", "image_unrecognised"),
    (_png()[:40], "picture 0: image_"),
    ("a path", "pass the encoded image's bytes"),
])
def test_a_bad_picture_names_the_rule_it_breaks(make_model, picture, match):
    with pytest.raises(SearchError, match=match):
        _searcher(*make_model("ciea")).encode_pictures([picture])


def test_one_text_per_picture(make_model):
    s = _searcher(*make_model("ciea"))
    with pytest.raises(SearchError, match="one text"):
        s.encode_pictures([_png(), _png()], ["only one"])
    with pytest.raises(SearchError, match="list of pictures"):
        s.encode_pictures(_png())
