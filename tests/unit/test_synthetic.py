"""Unit tests for the synthetic corpus (pipelines/ingest/sources/synthetic/generator.py)."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import string

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.ingest.sources.synthetic import generator as syn
from pipelines.ingest.sources.synthetic.generator import (
    ALWAYS_STATED,
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    BACKGROUND_RGB,
    COLOR_RGB,
    DOCUMENT_SCHEMA,
    OPTIONAL_ATTRIBUTES,
    POSITIONS,
    SHAPES,
    TEXT_PARAMETER_VALUES,
    TEXT_PARAMETERS,
    TOPICS,
    SyntheticConfig,
    attribute_arrays,
    attribute_vocabulary,
    caption_for,
    generate_queries,
    iter_document_batches,
    iter_documents,
    relevant_indices,
    relevant_text_indices,
    render_image,
    sample_attributes,
    sample_text_parameters,
    text_for,
    text_parameter_arrays,
    text_query_for,
    tokenize,
    value_words,
    write_qrels,
)
from pipelines.ingest.sources.synthetic.generator import (
    COLLECTIONS as ALL_COLLECTIONS,
)

SMALL = SyntheticConfig(seed=3, num_image_docs=120, num_text_docs=30, num_queries=(60, 15, 25))


@pytest.fixture(scope="module")
def small_docs() -> list[dict]:
    return list(iter_documents(SMALL))


@pytest.fixture(scope="module")
def small_queries() -> dict[str, list[dict]]:
    return generate_queries(SMALL)


def _captions_by_id(docs: list[dict]) -> dict[str, str]:
    return {d["doc_id"]: d["caption"] for d in docs if d["modality"] == "image"}


def _template_words(templates: tuple[str, ...]) -> set[str]:
    words: set[str] = set()
    for t in templates:
        literal = "".join(lit for lit, *_ in string.Formatter().parse(t))
        words |= set(tokenize(literal))
    return words


# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------


def test_vocabularies_are_disjoint_from_each_other_and_from_template_glue():
    vocabs = {a: attribute_vocabulary(a) for a in ATTRIBUTES}
    for a, b in itertools.combinations(ATTRIBUTES, 2):
        assert not vocabs[a] & vocabs[b], (a, b, vocabs[a] & vocabs[b])
    all_vocab = set().union(*vocabs.values())
    glue = (
        _template_words(syn._CAPTION_TEMPLATES)
        | _template_words(syn._QUERY_TEMPLATES)
        | _template_words(syn._BACKGROUND_PHRASES)
        | {"the", "motif", "a", "an"}
        | set().union(*(tokenize(p) for p in syn._POSITION_PHRASES.values()))
    ) - vocabs["position"]
    assert not glue & all_vocab, glue & all_vocab
    # Every value must be a single word so "mentioned" == "a vocabulary word occurs".
    for a in ATTRIBUTES:
        for v in ATTRIBUTE_VALUES[a]:
            assert all(len(tokenize(w)) == 1 for w in value_words(a, v))
    assert len(syn.COLLECTIONS) == len(set(syn.COLLECTIONS)) >= 30


def test_topics_are_in_no_other_vocabulary_or_template():
    topics = set(TOPICS)
    assert len(topics) == len(TOPICS) >= 10
    assert all(len(tokenize(t)) == 1 for t in TOPICS)
    all_vocab = set().union(*(attribute_vocabulary(a) for a in ATTRIBUTES))
    assert not topics & all_vocab
    text_glue = (
        _template_words(syn._TEXT_TEMPLATES)
        | _template_words(syn._TEXT_QUERY_TEMPLATES)
        | _template_words(syn._TEXT_QUERY_COLOR_TEMPLATES)
    )
    every_glue = (
        text_glue
        | _template_words(syn._CAPTION_TEMPLATES)
        | _template_words(syn._QUERY_TEMPLATES)
        | _template_words(syn._BACKGROUND_PHRASES)
        | set().union(*(tokenize(p) for p in syn._POSITION_PHRASES.values()))
    )
    assert not topics & every_glue, topics & every_glue
    # Text templates name values only through their fields.
    assert not text_glue & all_vocab, text_glue & all_vocab
    # Text parameter values come from the image vocabularies (plus topics).
    for name, values in TEXT_PARAMETER_VALUES.items():
        if name != "topic":
            assert set(values) <= set(ATTRIBUTE_VALUES[name]), name


# ---------------------------------------------------------------------------
# Determinism, sharding, attribute agreement
# ---------------------------------------------------------------------------


def test_same_seed_gives_identical_documents_and_queries(small_docs, small_queries):
    assert list(iter_documents(SMALL)) == small_docs
    assert generate_queries(SMALL) == small_queries
    other = dataclasses.replace(SMALL, seed=4)
    other_docs = list(iter_documents(other))
    assert [d["image"] for d in other_docs] != [d["image"] for d in small_docs]
    assert [d["caption"] for d in other_docs] != [d["caption"] for d in small_docs]
    assert [d["text"] for d in other_docs] != [d["text"] for d in small_docs]
    assert generate_queries(other) != small_queries


def test_document_ids_order_and_fields(small_docs):
    assert len(small_docs) == SMALL.num_documents
    images, texts = small_docs[: SMALL.num_image_docs], small_docs[SMALL.num_image_docs :]
    assert [d["doc_id"] for d in images] == [f"img-{i:09d}" for i in range(len(images))]
    assert [d["doc_id"] for d in texts] == [f"txt-{i:09d}" for i in range(len(texts))]
    for d in images:
        assert d["modality"] == "image" and d["text"] == "" and d["caption"]
        assert isinstance(d["image"], bytes) and d["image"][:8] == b"\x89PNG\r\n\x1a\n"
    for j, d in enumerate(texts):
        assert d["modality"] == "text" and d["caption"] == "" and d["text"]
        assert d["image"] is None
        assert json.loads(d["attributes"]) == sample_text_parameters(SMALL, j)


def test_sharded_iteration_matches_full_iteration(small_docs):
    assert list(iter_documents(SMALL, 10, 20)) == small_docs[10:20]
    n = SMALL.num_image_docs
    # A shard that straddles the image/text boundary.
    assert list(iter_documents(SMALL, n - 5, n + 5)) == small_docs[n - 5 : n + 5]
    # stop past the end is clamped.
    assert list(iter_documents(SMALL, n + 20, 10**9)) == small_docs[n + 20 :]
    assert list(iter_documents(SMALL, 7, 7)) == []
    with pytest.raises(ValueError):
        list(iter_documents(SMALL, 20, 10))


def test_attribute_arrays_agree_with_sample_attributes_and_documents(small_docs):
    cfg = dataclasses.replace(SMALL, num_image_docs=5000)
    codes = attribute_arrays(cfg)
    for name in ATTRIBUTES:
        assert codes[name].dtype == np.int8 and codes[name].shape == (5000,)
    for i in list(range(50)) + [1234, 4999]:
        attrs = sample_attributes(cfg, i)
        for name in ATTRIBUTES:
            assert attrs[name] == ATTRIBUTE_VALUES[name][codes[name][i]]
        expected_stated = tuple(
            a for j, a in enumerate(OPTIONAL_ATTRIBUTES) if codes["stated"][i, j]
        )
        assert attrs["stated"] == expected_stated
    # A sub-range computed on its own agrees with the full arrays.
    part = attribute_arrays(cfg, 1000, 1100)
    for key, arr in part.items():
        np.testing.assert_array_equal(arr, codes[key][1000:1100])
    # The JSON attributes stored on documents are the same true attributes.
    for i, d in enumerate(small_docs[: SMALL.num_image_docs]):
        stored = json.loads(d["attributes"])
        attrs = sample_attributes(SMALL, i)
        assert stored == {**attrs, "stated": list(attrs["stated"])}
    with pytest.raises(IndexError):
        sample_attributes(cfg, 5000)


def test_text_parameter_arrays_agree_with_sample_text_parameters():
    cfg = dataclasses.replace(SMALL, num_text_docs=5000)
    codes = text_parameter_arrays(cfg)
    assert set(codes) == set(TEXT_PARAMETERS)
    for name in TEXT_PARAMETERS:
        assert codes[name].dtype == np.int8 and codes[name].shape == (5000,)
    for j in list(range(50)) + [1234, 4999]:
        params = sample_text_parameters(cfg, j)
        assert set(params) == set(TEXT_PARAMETERS)
        for name in TEXT_PARAMETERS:
            assert params[name] == TEXT_PARAMETER_VALUES[name][codes[name][j]]
    part = text_parameter_arrays(cfg, 1000, 1100)
    for key, arr in part.items():
        np.testing.assert_array_equal(arr, codes[key][1000:1100])
    # Text parameters do not depend on the image count (own index space and streams).
    other = text_parameter_arrays(dataclasses.replace(cfg, num_image_docs=7), 0, 100)
    for key, arr in other.items():
        np.testing.assert_array_equal(arr, codes[key][:100])
    # Different seeds give different parameters.
    reseeded = text_parameter_arrays(dataclasses.replace(cfg, seed=4), 0, 100)
    assert not np.array_equal(reseeded["topic"], codes["topic"][:100])
    with pytest.raises(IndexError):
        sample_text_parameters(cfg, 5000)
    with pytest.raises(IndexError):
        text_parameter_arrays(cfg, 10, 5001)


def test_text_parameter_distributions_cover_all_values():
    cfg = SyntheticConfig(num_text_docs=20000)
    codes = text_parameter_arrays(cfg)
    for name in TEXT_PARAMETERS:
        k = len(TEXT_PARAMETER_VALUES[name])
        freq = np.bincount(codes[name], minlength=k) / 20000
        assert freq.min() > 0.5 / k and freq.max() < 1.5 / k, (name, freq)


def _check_text(params: dict, text: str) -> None:
    words = set(tokenize(text))
    # Exactly its own topic, collection and colour: no other value of those.
    assert words & set(TOPICS) == {params["topic"]}, (params, text)
    assert words & set(syn.COLLECTIONS) == {params["collection"]}, (params, text)
    assert words & set(syn.COLORS) == {params["color"]}, (params, text)
    # Any other attribute word in the text is the document's own (distractor) value.
    for name in ("background", "shape", "count", "position"):
        assert words & attribute_vocabulary(name) <= value_words(name, params[name]), (
            name,
            params,
            text,
        )


def test_text_documents_name_their_topic_collection_and_colour():
    cfg = dataclasses.replace(SMALL, num_image_docs=3, num_text_docs=600)
    docs = list(iter_documents(cfg, cfg.num_image_docs))
    assert len(docs) == 600
    templates = set()
    for j, d in enumerate(docs):
        params = sample_text_parameters(cfg, j)
        _check_text(params, d["text"])
        templates.add(d["text"].split()[0])
    assert len(templates) >= 4  # several templates are in use
    rng = np.random.default_rng(0)
    params = sample_text_parameters(cfg, 0)
    for _ in range(50):
        _check_text(params, text_for(params, rng))
    _check_text(params, text_for(params))
    # The text is a pure function of (seed, index): sharding does not change it.
    assert list(iter_documents(cfg, cfg.num_image_docs + 5, cfg.num_image_docs + 9)) == docs[5:9]


def test_attribute_distributions_cover_all_values():
    cfg = SyntheticConfig(num_image_docs=20000, p_caption_states=0.35)
    codes = attribute_arrays(cfg)
    for name in ATTRIBUTES:
        k = len(ATTRIBUTE_VALUES[name])
        freq = np.bincount(codes[name], minlength=k) / 20000
        assert freq.min() > 0.5 / k and freq.max() < 1.5 / k, (name, freq)
    rate = codes["stated"].mean(axis=0)
    assert np.all(np.abs(rate - 0.35) < 0.03), rate


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------


def _check_caption(attrs: dict, caption: str) -> None:
    words = set(tokenize(caption))
    for name in ATTRIBUTES:
        stated = name in ALWAYS_STATED or name in attrs["stated"]
        if stated:
            assert value_words(name, attrs[name]) & words, (name, attrs, caption)
        else:
            # Not just the true value: no word of any value of the attribute.
            assert not attribute_vocabulary(name) & words, (name, attrs, caption)


@pytest.mark.parametrize("p", [0.0, 0.35, 1.0])
def test_captions_state_exactly_the_stated_attributes(p):
    cfg = SyntheticConfig(
        seed=11, num_image_docs=3000, p_caption_states=p, complementary_fraction=0.0
    )
    rng = np.random.default_rng(0)
    for i in range(cfg.num_image_docs):
        attrs = sample_attributes(cfg, i)
        if p == 0.0:
            assert attrs["stated"] == ()
        if p == 1.0:
            assert attrs["stated"] == OPTIONAL_ATTRIBUTES
        _check_caption(attrs, caption_for(attrs, rng))
    _check_caption(sample_attributes(cfg, 0), caption_for(sample_attributes(cfg, 0), None))


def test_document_captions_state_exactly_the_stated_attributes(small_docs):
    for d in small_docs[: SMALL.num_image_docs]:
        _check_caption(json.loads(d["attributes"]), d["caption"])


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def _check_image(img: Image.Image, attrs: dict, size: int) -> None:
    assert img.mode == "RGB" and img.size == (size, size)
    arr = np.asarray(img)
    bg = np.array(BACKGROUND_RGB[attrs["background"]], dtype=np.uint8)
    c = max(2, size // 16)
    for patch in (arr[:c, :c], arr[:c, -c:], arr[-c:, :c], arr[-c:, -c:]):
        assert np.all(patch == bg), attrs
    fg = np.array(COLOR_RGB[attrs["color"]], dtype=np.uint8)
    n_fg = int(np.all(arr == fg, axis=-1).sum())
    assert n_fg > 0, attrs
    # Nothing but background and shape colour (no anti-aliasing).
    n_bg = int(np.all(arr == bg, axis=-1).sum())
    assert n_fg + n_bg == size * size


def test_rendered_document_images_decode_with_background_corners_and_shape_pixels(small_docs):
    for i, d in enumerate(small_docs[: SMALL.num_image_docs]):
        img = Image.open(io.BytesIO(d["image"]))
        img.load()
        assert img.format == "PNG"
        _check_image(img, sample_attributes(SMALL, i), SMALL.image_size)


@pytest.mark.parametrize("size", [16, 64, 128])
def test_render_image_every_shape_position_count(size):
    rng = np.random.default_rng(0)
    for shape, position, count in itertools.product(SHAPES, POSITIONS, syn.COUNTS):
        attrs = {
            "shape": shape,
            "color": "red",
            "background": "navy",
            "count": count,
            "position": position,
            "collection": "harbor",
            "stated": (),
        }
        _check_image(render_image(attrs, size, rng), attrs, size)
        _check_image(render_image(attrs, size), attrs, size)


def test_position_moves_shape_pixels():
    base = {
        "shape": "square",
        "color": "black",
        "background": "grey",
        "count": 1,
        "collection": "zoo",
        "stated": (),
    }
    fg = np.array(COLOR_RGB["black"])

    def centroid(position: str) -> tuple[float, float]:
        arr = np.asarray(render_image({**base, "position": position}, 64))
        ys, xs = np.nonzero(np.all(arr == fg, axis=-1))
        return xs.mean(), ys.mean()

    assert centroid("left")[0] < centroid("center")[0] < centroid("right")[0]
    assert centroid("top")[1] < centroid("center")[1] < centroid("bottom")[1]


# ---------------------------------------------------------------------------
# Queries and qrels
# ---------------------------------------------------------------------------


def test_query_counts_ids_uniqueness_and_kind_mix(small_queries):
    assert list(small_queries) == ["train", "dev", "test"]
    texts = []
    for split, n in zip(("train", "dev", "test"), SMALL.num_queries, strict=True):
        qs = small_queries[split]
        assert len(qs) == n
        assert [q["qid"] for q in qs] == [f"{split}-{k:06d}" for k in range(n)]
        assert all(q["split"] == split for q in qs)
        n_image = sum(q["kind"] == "image" for q in qs)
        assert n_image == round(SMALL.complementary_fraction * n)
        n_text = sum(q["kind"] == "text" for q in qs)
        assert n_text == round(SMALL.text_query_fraction * n) > 0
        assert sum(q["kind"] == "caption" for q in qs) == n - n_image - n_text
        texts += [q["query"] for q in qs]
    assert len(texts) == len(set(texts))


@pytest.mark.parametrize(
    "frac, text_frac", [(0.0, 0.0), (0.2, 0.3), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]
)
def test_kind_mix_follows_the_fractions(frac, text_frac):
    cfg = dataclasses.replace(
        SMALL,
        num_image_docs=2000,
        num_text_docs=1000,
        num_queries=(200, 50, 30),
        complementary_fraction=frac,
        text_query_fraction=text_frac,
    )
    qs = generate_queries(cfg)
    for split, n in zip(("train", "dev", "test"), cfg.num_queries, strict=True):
        n_image = sum(q["kind"] == "image" for q in qs[split])
        n_text = sum(q["kind"] == "text" for q in qs[split])
        assert n_image == round(frac * n)
        assert n_text == round(text_frac * n)
        assert sum(q["kind"] == "caption" for q in qs[split]) == n - n_image - n_text


def test_kind_counts_are_exact_and_never_exceed_the_split():
    for frac, text_frac in [(0.7, 0.3), (0.5, 0.5), (0.25, 0.75), (0.35, 0.45), (0.0, 0.3)]:
        cfg = SyntheticConfig(complementary_fraction=frac, text_query_fraction=text_frac)
        for n in range(60):
            n_caption, n_image, n_text = syn._kind_counts(cfg, n)
            assert n_caption >= 0 and n_caption + n_image + n_text == n
            # complementary_fraction keeps its meaning: the share of image queries.
            assert n_image == round(frac * n)
            # Text gets its rounded share unless both shares rounded up past n.
            assert n_text == min(round(text_frac * n), n - n_image)
            assert abs(n_text - text_frac * n) <= 1
    # 0.7 * 5 and 0.3 * 5 both round up (4 + 2 > 5): text takes the one left.
    assert syn._kind_counts(SyntheticConfig(complementary_fraction=0.7), 5) == (0, 4, 1)


def test_query_constraints_match_kind_and_target_caption(small_docs, small_queries):
    captions = _captions_by_id(small_docs)
    for q in itertools.chain.from_iterable(small_queries.values()):
        target = int(q["target_doc_id"].split("-")[1])
        if q["kind"] == "text":
            _check_text_query(q, sample_text_parameters(SMALL, target))
            continue
        assert q["target_doc_id"].startswith("img-")
        attrs = sample_attributes(SMALL, target)
        stated = set(ALWAYS_STATED) | set(attrs["stated"])
        cons = q["constraints"]
        # Constraints are the target's true values.
        assert all(attrs[k] == v for k, v in cons.items())
        assert set(ALWAYS_STATED) <= set(cons)
        qwords = set(tokenize(q["query"]))
        for k, v in cons.items():
            assert value_words(k, v) & qwords, (k, v, q["query"])
        caption_words = set(tokenize(captions[q["target_doc_id"]]))
        if q["kind"] == "caption":
            assert set(cons) == stated
            assert set(cons) <= stated
        else:
            assert q["kind"] == "image"
            unstated = set(cons) - stated
            assert 1 <= len(unstated) <= 2
            assert stated <= set(cons)
            assert qwords - caption_words, (q["query"], captions[q["target_doc_id"]])


def _check_text_query(q: dict, params: dict) -> None:
    assert q["target_doc_id"].startswith("txt-")
    cons = q["constraints"]
    assert {"topic", "collection"} <= set(cons) <= {"topic", "collection", "color"}
    # Constraints are the target's parameters, and the query names exactly them.
    assert all(params[k] == v for k, v in cons.items())
    words = set(tokenize(q["query"]))
    assert words & set(TOPICS) == {cons["topic"]}, q["query"]
    assert words & set(syn.COLLECTIONS) == {cons["collection"]}, q["query"]
    assert words & set(syn.COLORS) == ({cons["color"]} if "color" in cons else set())
    assert q["query"] == q["query"].lower()
    # No image vocabulary beyond the colour, so nothing points at an image.
    for name in ("shape", "background", "count", "position"):
        assert not words & attribute_vocabulary(name), (name, q["query"])


def test_text_query_for_names_exactly_the_constraints():
    rng = np.random.default_rng(0)
    for cons in (
        {"topic": "kites", "collection": "harbor"},
        {"topic": "clocks", "collection": "zoo", "color": "orange"},
    ):
        for gen in (rng,) * 20 + (None,):
            text = text_query_for(cons, gen)
            _check_text_query(
                {"query": text, "constraints": cons, "target_doc_id": "txt-000000000"}, cons
            )


def test_positives_are_exactly_the_docs_satisfying_constraints():
    # Low variety (few collections are hit often) so queries have several positives.
    cfg = SyntheticConfig(seed=7, num_image_docs=400, num_text_docs=20, num_queries=(80, 20, 20))
    queries = generate_queries(cfg)
    truth = [sample_attributes(cfg, i) for i in range(cfg.num_image_docs)]
    multi = 0
    all_q = list(itertools.chain.from_iterable(queries.values()))
    assert {q["kind"] for q in all_q} == {"caption", "image", "text"}
    for q in all_q:
        if q["kind"] == "text":
            continue  # checked brute force in the next test
        expected = [
            f"img-{i:09d}"
            for i, a in enumerate(truth)
            if all(a[k] == v for k, v in q["constraints"].items())
        ]
        assert q["positive_doc_ids"] == expected
        assert q["positive_doc_ids"] == sorted(q["positive_doc_ids"])
        assert q["target_doc_id"] in q["positive_doc_ids"]
        # Text documents stay distractors for image and caption queries.
        assert not any(d.startswith("txt-") for d in q["positive_doc_ids"])
        multi += len(expected) > 1
    assert multi > 0  # the check above exercised non-target positives too
    rows = write_qrels(all_q)
    assert rows == [(q["qid"], d, 1) for q in all_q for d in q["positive_doc_ids"]]
    assert all(isinstance(r[0], str) and isinstance(r[1], str) and r[2] == 1 for r in rows)


def test_text_query_positives_are_exactly_the_matching_text_docs():
    # ~2000 text docs over 12 topics x 40 collections: several per (topic, collection).
    cfg = SyntheticConfig(
        seed=5,
        num_image_docs=50,
        num_text_docs=2000,
        num_queries=(60, 20, 20),
        complementary_fraction=0.2,
        text_query_fraction=0.6,
    )
    queries = generate_queries(cfg)
    truth = [sample_text_parameters(cfg, j) for j in range(cfg.num_text_docs)]
    texts = [d["text"] for d in iter_documents(cfg, cfg.num_image_docs)]
    text_q = [q for split in queries.values() for q in split if q["kind"] == "text"]
    assert len(text_q) == 60
    multi = with_color = 0
    for q in text_q:
        cons = q["constraints"]
        expected = [
            f"txt-{j:09d}" for j, p in enumerate(truth) if all(p[k] == v for k, v in cons.items())
        ]
        assert q["positive_doc_ids"] == expected
        assert q["target_doc_id"] in expected
        assert not any(d.startswith("img-") for d in q["positive_doc_ids"])
        _check_text_query(q, truth[int(q["target_doc_id"].split("-")[1])])
        # Relevance is visible in the text: exactly the docs naming every constrained value.
        by_words = [
            f"txt-{j:09d}" for j, t in enumerate(texts) if set(cons.values()) <= set(tokenize(t))
        ]
        assert by_words == expected
        multi += len(expected) > 1
        with_color += "color" in cons
    assert multi > 0 and 0 < with_color < len(text_q)
    for q in itertools.chain.from_iterable(queries.values()):
        if q["kind"] != "text":
            assert q["target_doc_id"].startswith("img-")
            assert all(d.startswith("img-") for d in q["positive_doc_ids"])


def test_test_split_is_stable_when_train_size_changes():
    a = generate_queries(dataclasses.replace(SMALL, num_image_docs=2000, num_queries=(10, 5, 30)))
    b = generate_queries(dataclasses.replace(SMALL, num_image_docs=2000, num_queries=(50, 5, 30)))
    assert a["test"] == b["test"] and a["dev"] == b["dev"]
    assert {q["kind"] for q in a["test"]} == {"caption", "image", "text"}


def test_impossible_query_budget_raises():
    cfg = SyntheticConfig(
        num_image_docs=1, num_text_docs=0, num_queries=(50, 0, 0), text_query_fraction=0.0
    )
    with pytest.raises(RuntimeError, match="too small"):
        generate_queries(cfg)
    # One text document allows only a handful of distinct text queries.
    cfg = SyntheticConfig(
        num_image_docs=10,
        num_text_docs=1,
        num_queries=(50, 0, 0),
        complementary_fraction=0.0,
        text_query_fraction=1.0,
    )
    with pytest.raises(RuntimeError, match="num_text_docs=1"):
        generate_queries(cfg)


def test_generate_queries_at_scale():
    cfg = SyntheticConfig(
        seed=1, num_image_docs=200_000, num_text_docs=100_000, num_queries=(300, 50, 50)
    )
    queries = generate_queries(cfg)
    all_q = list(itertools.chain.from_iterable(queries.values()))
    assert len(all_q) == 400
    assert len({q["query"] for q in all_q}) == 400
    codes = attribute_arrays(cfg)
    text_codes = text_parameter_arrays(cfg)
    checked = {"caption": 0, "image": 0, "text": 0}
    for q in all_q[:60]:
        if q["kind"] == "text":
            idx = relevant_text_indices(text_codes, q["constraints"])
            expected = [f"txt-{j:09d}" for j in idx]
        else:
            expected = [f"img-{i:09d}" for i in relevant_indices(codes, q["constraints"])]
        assert q["positive_doc_ids"] == expected
        assert q["target_doc_id"] in expected
        checked[q["kind"]] += 1
    assert min(checked.values()) > 0, checked


# ---------------------------------------------------------------------------
# Arrow batches
# ---------------------------------------------------------------------------


def test_record_batches_match_documents_and_schema(small_docs):
    batches = list(iter_document_batches(SMALL, batch_size=32))
    assert all(b.schema == DOCUMENT_SCHEMA for b in batches)
    assert [b.num_rows for b in batches[:-1]] == [32] * (len(batches) - 1)
    table = pa.Table.from_batches(batches, schema=DOCUMENT_SCHEMA)
    assert table.to_pylist() == small_docs
    assert DOCUMENT_SCHEMA.field("image").type == pa.binary()
    assert DOCUMENT_SCHEMA.field("image").nullable
    sharded = list(iter_document_batches(SMALL, batch_size=4, start=115, stop=125))
    assert pa.Table.from_batches(sharded).to_pylist() == small_docs[115:125]
    with pytest.raises(ValueError):
        next(iter_document_batches(SMALL, batch_size=0))


# ---------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("seed", -1),
        ("seed", 1.5),
        ("num_image_docs", 0),
        ("num_text_docs", -3),
        ("num_queries", (1, 2)),
        ("num_queries", (1, -2, 3)),
        ("image_size", 8),
        ("image_size", 4096),
        ("p_caption_states", 1.5),
        ("p_caption_states", -0.1),
        ("complementary_fraction", 2.0),
        ("text_query_fraction", 1.5),
        ("text_query_fraction", -0.1),
        ("text_query_fraction", "0.3"),
        ("num_image_docs", True),
    ],
)
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field) as info:
        SyntheticConfig(**{field: value})
    assert repr(value) in str(info.value)
    assert "allowed" in str(info.value)


def test_config_rejects_image_queries_when_captions_state_everything():
    with pytest.raises(ValueError, match="complementary_fraction"):
        SyntheticConfig(p_caption_states=1.0, complementary_fraction=0.5)
    SyntheticConfig(p_caption_states=1.0, complementary_fraction=0.0)


def test_config_rejects_image_plus_text_share_above_one():
    with pytest.raises(ValueError, match="text_query_fraction") as info:
        SyntheticConfig(complementary_fraction=0.8, text_query_fraction=0.3)
    assert "complementary_fraction" in str(info.value) and "0.3" in str(info.value)
    SyntheticConfig(complementary_fraction=0.7, text_query_fraction=0.3)
    SyntheticConfig(complementary_fraction=0.0, text_query_fraction=1.0)


def test_config_rejects_text_queries_without_text_documents():
    with pytest.raises(ValueError, match="text_query_fraction") as info:
        SyntheticConfig(num_text_docs=0)
    assert "num_text_docs" in str(info.value) and "text_query_fraction=0" in str(info.value)
    SyntheticConfig(num_text_docs=0, text_query_fraction=0.0)


def test_num_collections_limits_the_collections_in_use():
    cfg = SyntheticConfig(num_image_docs=400, num_text_docs=50, num_queries=(20, 5, 5), num_collections=3)
    used = {sample_attributes(cfg, i)["collection"] for i in range(cfg.num_image_docs)}
    assert used == set(ALL_COLLECTIONS[:3])
    with pytest.raises(ValueError, match="num_collections"):
        SyntheticConfig(num_collections=0)


def test_strict_image_queries_cannot_be_answered_from_any_caption():
    cfg = SyntheticConfig(num_image_docs=600, num_text_docs=60, num_queries=(60, 20, 20), num_collections=4)
    docs = {d["doc_id"]: d for d in iter_documents(cfg, 0, cfg.num_image_docs)}
    image_queries = [q for split in generate_queries(cfg).values() for q in split if q["kind"] == "image"]
    assert image_queries
    for q in image_queries:
        target_stated = set(sample_attributes(cfg, int(q["target_doc_id"][4:]))["stated"])
        asked = [a for a in q["constraints"] if a not in target_stated and a not in ("shape", "collection")]
        assert asked
        for doc_id in q["positive_doc_ids"]:
            stated = set(json.loads(docs[doc_id]["attributes"])["stated"])
            assert not stated & set(asked), (q["query"], docs[doc_id]["caption"])
    # Without the rule some image query has a positive whose caption states what it asks.
    loose = generate_queries(dataclasses.replace(cfg, strict_complementary=False))
    assert any(
        set(json.loads(docs[d]["attributes"])["stated"]) & {
            a for a in q["constraints"]
            if a not in sample_attributes(cfg, int(q["target_doc_id"][4:]))["stated"] and a not in ("shape", "collection")
        }
        for split in loose.values() for q in split if q["kind"] == "image" for d in q["positive_doc_ids"]
    )


def test_image_text_pairs_describe_every_visual_attribute_and_match_their_pixels():
    pairs = list(syn.iter_image_text_pairs(5, 300, 32))
    again = list(syn.iter_image_text_pairs(5, 300, 32))
    assert [t for _, t in pairs] == [t for _, t in again]
    assert all(a.tobytes() == b.tobytes() for (a, _), (b, _) in zip(pairs, again))
    collections = syn.attribute_vocabulary("collection")
    seen: dict[str, set] = {name: set() for name in ("shape", "color", "background", "count", "position")}
    for image, text in pairs:
        words = set(syn.tokenize(text))
        for name in seen:
            named = [v for v in ATTRIBUTE_VALUES[name] if syn.value_words(name, v) & words]
            assert len(named) == 1, (name, text)
            seen[name].add(named[0])
        assert not words & collections, text  # no pixel shows the collection
        [background] = [bg for bg in BACKGROUND_RGB if bg in words]
        assert image.size == (32, 32) and image.getpixel((0, 0)) == BACKGROUND_RGB[background]
    assert all(len(seen[name]) == len(ATTRIBUTE_VALUES[name]) for name in seen)
    # Another seed draws other pairs (as CLIP's pretraining data differs from the corpus).
    other = [t for _, t in syn.iter_image_text_pairs(6, 300, 32)]
    assert other != [t for _, t in pairs]
