"""Synthetic image/text corpus: the embedded default corpus for the demo and the tests.

The corpus exists to exercise CIEA's premise that images carry information their
captions omit. Every image document has six true attributes; its caption always
states ``shape`` and ``collection`` and states each of ``color``, ``background``,
``count`` and ``position`` only with probability ``p_caption_states``. Queries of
kind ``"image"`` ask about at least one attribute the target's caption leaves out,
so a caption-only retriever cannot answer them but one that looks at pixels can.

Determinism and streaming:

* Attributes are a counter-based hash of ``(seed, attribute, doc index)``
  (splitmix64), computed vectorised over numpy arrays. ``sample_attributes(cfg, i)``
  evaluates the same hash at one index, so document ``i`` can be made without
  making documents ``0..i-1`` and the arrays always agree with the per-document
  view. This is what lets ``iter_documents`` shard and ``generate_queries`` work
  at a million documents without rendering anything.
* Caption template choice and render jitter use per-document generators
  (``np.random.default_rng([seed, stream, i])``), again independent of other docs.

Representation choices:

* ``COUNTS`` are ints ``(1, 2, 3)``; attribute dicts and query constraints hold the
  int. Text spells them with ``COUNT_WORDS`` ("one", "two", "three").
* Attribute codes in ``attribute_arrays`` are int8 indices into the value tuples
  (``SHAPES``, ``COLORS``, ...; for count, ``COUNTS.index(count)``).
* Every attribute value is a single word and the vocabularies of different
  attributes (and the template glue words) are pairwise disjoint, so "the caption
  mentions attribute X" is exactly "a word of X's vocabulary occurs in it".
* Global document order is image docs ``0..num_image_docs-1`` then text docs.

Text documents and text-answer queries (as in WebQA, whose queries are about half
image-answer and half text-answer):

* Every text document has hashed parameters (``TEXT_PARAMETERS``: a ``topic`` noun
  from ``TOPICS``, a ``collection``, a ``color`` and distractor ``background``,
  ``shape``, ``count`` and ``position`` values), computed vectorised by
  ``text_parameter_arrays`` and per document by ``sample_text_parameters`` with the
  same splitmix scheme on their own stream ids. Its text always names its topic,
  collection and colour, and no other value of those three vocabularies.
* Queries of kind ``"text"`` ask about a target text document's topic and
  collection (sometimes also its colour); all text documents with those parameters
  are relevant and no image document is. Text documents are never relevant to
  ``"image"`` or ``"caption"`` queries, where they stay distractors; as positives
  of text queries they also appear as in-batch negatives during training.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
COLORS: tuple[str, ...] = (
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
)
# Background names share no word with shape colours, so a caption that states the
# background cannot be read as stating the shape colour (and vice versa).
BACKGROUNDS: tuple[str, ...] = ("grey", "pink", "cyan", "brown", "navy", "olive")
COUNTS: tuple[int, ...] = (1, 2, 3)
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
# Single words only, none of which is a shape, colour, count or position word.
COLLECTIONS: tuple[str, ...] = (
    "harbor",
    "garden",
    "museum",
    "library",
    "market",
    "station",
    "forest",
    "desert",
    "village",
    "castle",
    "bridge",
    "temple",
    "island",
    "valley",
    "canyon",
    "meadow",
    "airport",
    "stadium",
    "theater",
    "cathedral",
    "lighthouse",
    "vineyard",
    "glacier",
    "orchard",
    "monastery",
    "bazaar",
    "observatory",
    "aquarium",
    "zoo",
    "palace",
    "quarry",
    "mill",
    "farm",
    "beach",
    "lagoon",
    "cemetery",
    "gallery",
    "university",
    "hospital",
    "factory",
)

COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
    "diamond": "diamonds",
}

#: Attribute name -> tuple of possible values, in code order.
ATTRIBUTE_VALUES: dict[str, tuple[Any, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "background": BACKGROUNDS,
    "count": COUNTS,
    "position": POSITIONS,
    "collection": COLLECTIONS,
}
ATTRIBUTES: tuple[str, ...] = tuple(ATTRIBUTE_VALUES)
#: Attributes a caption always states.
ALWAYS_STATED: tuple[str, ...] = ("shape", "collection")
#: Attributes a caption states independently with probability ``p_caption_states``.
OPTIONAL_ATTRIBUTES: tuple[str, ...] = ("color", "background", "count", "position")

# Topics of text documents: plural nouns that occur in no other vocabulary and in
# no template, so "the text is about topic X" is exactly "X's word occurs in it".
TOPICS: tuple[str, ...] = (
    "lanterns",
    "benches",
    "kites",
    "fountains",
    "statues",
    "murals",
    "barrels",
    "bicycles",
    "umbrellas",
    "clocks",
    "tiles",
    "flags",
)
#: Counts a text document can state: plural only, the templates use plural nouns.
TEXT_COUNTS: tuple[int, ...] = (2, 3)
#: Text parameter name -> tuple of possible values, in code order.
TEXT_PARAMETER_VALUES: dict[str, tuple[Any, ...]] = {
    "topic": TOPICS,
    "collection": COLLECTIONS,
    "color": COLORS,
    "background": BACKGROUNDS,
    "shape": SHAPES,
    "count": TEXT_COUNTS,
    "position": POSITIONS,
}
TEXT_PARAMETERS: tuple[str, ...] = tuple(TEXT_PARAMETER_VALUES)
#: Parameters every text query constrains (``color`` is sometimes added).
TEXT_QUERY_KEYS: tuple[str, ...] = ("topic", "collection")
#: Query kinds, in the order ``generate_queries`` documents them.
QUERY_KINDS: tuple[str, ...] = ("caption", "image", "text")
#: Kind of a composed query (reference image + modification text; ``num_composed``).
COMPOSED_KIND = "composed"
#: What a composed query keeps from its reference image: the visible content. Position is
#: left free (the modification never mentions it) and collection is not in the pixels.
COMPOSED_CONTENT: tuple[str, ...] = ("shape", "color", "background", "count")
#: Attributes a modification text may change (only ones the reference's caption omits).
COMPOSED_CHANGES: tuple[str, ...] = ("color", "background", "count")

# Exact fill colours. Rendering uses no anti-aliasing, so every shape pixel has
# exactly this RGB value, which the tests (and any probe) can count.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (130, 40, 170),
    "orange": (245, 140, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "pink": (255, 170, 200),
    "cyan": (60, 220, 230),
    "brown": (120, 70, 30),
    "navy": (20, 25, 90),
    "olive": (110, 110, 30),
}

_POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Cluster centre of each position, as fractions of the image side (x, y).
_POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}

_BACKGROUND_PHRASES: tuple[str, ...] = ("on {a_bg} background", "against {a_bg} backdrop")

# Caption templates. Glue words must stay disjoint from every attribute
# vocabulary (a unit test enforces it): e.g. no "one", "right", "top", "center".
_CAPTION_TEMPLATES: tuple[str, ...] = (
    "{np}{pos}{bg}, from the {coll} collection",
    "From the {coll} collection: {np}{pos}{bg}",
    "{np}{bg}{pos}, part of the {coll} collection",
    "Photo of {np}{pos}{bg} in the {coll} collection",
)
_QUERY_TEMPLATES: tuple[str, ...] = (
    "a photo of {np}{pos}{bg} from the {coll} collection",
    "{coll} collection picture with {np}{pos}{bg}",
    "find {np}{bg}{pos} in the {coll} collection",
    "show me {np}{pos}{bg}, {coll} collection",
)
# Text document templates. Each names the topic, collection and colour exactly
# once; the others add distractor words shared with image captions. Glue words
# stay disjoint from every vocabulary (a unit test enforces it).
_TEXT_TEMPLATES: tuple[str, ...] = (
    "In the {coll} archive, most {topic} are painted {color}.",
    "The {coll} guide lists {countw} {color} {topic} near the {shape} carving.",
    "Visitors to the {coll} often describe {color} {topic} below {a_bg} awning.",
    "Records from the {coll} mention {countw} {topic}, all {color}, beside a {shape} emblem.",
    "Most {topic} at the {coll} are painted {color} on {bg}.",
    "A map of the {coll} marks the {color} {topic} near the {pos} edge.",
)
# Text query templates: without and with a colour constraint.
_TEXT_QUERY_TEMPLATES: tuple[str, ...] = (
    "what colour are the {topic} in the {coll} archive",
    "which colour are most {topic} at the {coll} painted",
    "how are the {topic} of the {coll} painted",
    "{coll} records about the colour of its {topic}",
)
_TEXT_QUERY_COLOR_TEMPLATES: tuple[str, ...] = (
    "are the {topic} in the {coll} archive painted {color}",
    "{color} {topic} at the {coll}",
    "records of {color} {topic} in the {coll}",
    "where does the {coll} have {color} {topic}",
)
# Modification texts of composed queries, per changed attribute: each names the new value
# and nothing else of any vocabulary (a unit test checks the glue words).
_MODIFICATION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("the same but {value}", "make them {value}", "change the colour to {value}"),
    "background": ("the same but on {a_value} background", "put it against {a_value} backdrop",
                   "with {a_value} backdrop instead"),
    "count": ("the same with {value} of them", "make it {value} instead", "change how many to {value}"),
}
#: Near misses kept per composed query (documents with the reference's content, unchanged).
MAX_NEAR_MISSES = 50
# Probability that a text query also constrains the target's colour.
_P_TEXT_COLOR = 0.3

# Relative weights for which unstated attribute an "image" query asks about:
# colour and background are the most visually salient, so they dominate.
_COMPLEMENT_WEIGHTS: dict[str, float] = {
    "color": 3.0,
    "background": 3.0,
    "count": 2.0,
    "position": 2.0,
}
_P_TWO_COMPLEMENTS = 0.3

# Stream ids for the counter-based hash and for per-document generators.
_ATTR_STREAMS: dict[str, int] = {name: k for k, name in enumerate(ATTRIBUTES)}
_STATED_STREAMS: dict[str, int] = {name: 100 + k for k, name in enumerate(OPTIONAL_ATTRIBUTES)}
_TEXT_STREAMS: dict[str, int] = {name: 200 + k for k, name in enumerate(TEXT_PARAMETERS)}
_RNG_CAPTION = 1
_RNG_RENDER = 2
_RNG_TEXT = 3
_RNG_QUERIES = 4
_RNG_COMPOSED = 5

SPLITS: tuple[str, ...] = ("train", "dev", "test")

DOCUMENT_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("text", pa.string()),
        pa.field("caption", pa.string()),
        # Null for text documents; PNG bytes for image documents.
        pa.field("image", pa.binary(), nullable=True),
        pa.field("attributes", pa.string()),
    ]
)

_WORD_RE = re.compile(r"[a-z]+")
_MAX_IMAGE_SIZE = 1024
_MIN_IMAGE_SIZE = 16
_ARRAY_CHUNK = 1 << 20


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def _invalid(field: str, value: Any, allowed: str, fix: str) -> ValueError:
    return ValueError(f"SyntheticConfig.{field}={value!r} is invalid: allowed {allowed}. {fix}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_fraction(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and 0.0 <= v <= 1.0


#: (field, check, allowed values, fix) for each field of :class:`SyntheticConfig` on its own.
_FIELD_RULES: tuple[tuple[str, Callable[[Any], bool], str, str], ...] = (
    ("seed", lambda v: _is_int(v) and 0 <= v < 2**63, "an int in [0, 2**63)",
     "Use a non-negative integer seed."),
    ("num_image_docs", lambda v: _is_int(v) and v >= 1, "an int >= 1",
     "Queries need at least one image document to target."),
    ("num_text_docs", lambda v: _is_int(v) and v >= 0, "an int >= 0", "Use 0 for no text distractors."),
    ("num_queries", lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_int(n) and n >= 0 for n in v),
     "a tuple of three ints >= 0 (train, dev, test)", "Pass e.g. num_queries=(2000, 200, 400)."),
    ("num_collections", lambda v: _is_int(v) and 1 <= v <= len(COLLECTIONS), f"an int in [1, {len(COLLECTIONS)}]",
     "It is how many of COLLECTIONS are in use."),
    ("image_size", lambda v: _is_int(v) and _MIN_IMAGE_SIZE <= v <= _MAX_IMAGE_SIZE,
     f"an int in [{_MIN_IMAGE_SIZE}, {_MAX_IMAGE_SIZE}]",
     "Smaller images cannot show the shapes; larger ones waste storage."),
    ("p_caption_states", _is_fraction, "a float in [0, 1]", "It is a probability per optional attribute."),
    ("complementary_fraction", _is_fraction, "a float in [0, 1]", "It is the share of queries of kind 'image'."),
    ("text_query_fraction", _is_fraction, "a float in [0, 1]", "It is the share of queries of kind 'text'."),
    ("num_composed", lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_int(n) and n >= 0 for n in v),
     "a tuple of three ints >= 0 (train, dev, test)",
     "Pass e.g. num_composed=(400, 50, 100), or (0, 0, 0) for no composed queries."),
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic corpus.

    Attributes:
        seed: Non-negative integer seed; everything is a pure function of it.
        num_image_docs: Number of image documents (>= 1).
        num_text_docs: Number of text-only documents (>= 0): positives of ``"text"``
            queries and distractors for all other queries.
        num_queries: Number of (train, dev, test) queries.
        image_size: Side of the square RGB images, in pixels.
        p_caption_states: Probability that a caption states each optional attribute
            (color, background, count, position).
        complementary_fraction: Share of queries of kind ``"image"`` (those that
            ask about an attribute the target's caption omits).
        text_query_fraction: Share of queries of kind ``"text"`` (answered by text
            documents). ``complementary_fraction + text_query_fraction <= 1``; the
            rest are ``"caption"`` queries. Must be 0 when ``num_text_docs == 0``.
        num_composed: Number of (train, dev, test) composed queries (kind
            ``"composed"``: a reference image + a modification text), made on their own
            seeded stream *in addition to* ``num_queries``, so turning them on leaves the
            other queries as they were.
    """

    seed: int = 0
    num_image_docs: int = 2000
    num_text_docs: int = 1000
    num_queries: tuple[int, int, int] = (2000, 200, 400)
    image_size: int = 64
    p_caption_states: float = 0.35
    complementary_fraction: float = 0.5
    num_collections: int = len(COLLECTIONS)
    strict_complementary: bool = True
    text_query_fraction: float = 0.3
    num_composed: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        for name, ok, allowed, fix in _FIELD_RULES:
            if not ok(getattr(self, name)):
                raise _invalid(name, getattr(self, name), allowed, fix)
        if self.complementary_fraction > 0 and self.p_caption_states >= 1.0:
            # Every caption would state everything, leaving nothing for an "image" query.
            raise _invalid("complementary_fraction", self.complementary_fraction,
                           "0 when p_caption_states == 1",
                           "Lower p_caption_states below 1 or set complementary_fraction=0.")
        if self.complementary_fraction + self.text_query_fraction > 1.0 + 1e-9:
            raise _invalid("text_query_fraction", self.text_query_fraction,
                           f"at most 1 - complementary_fraction = {1.0 - self.complementary_fraction:g}",
                           "complementary_fraction ('image' share) plus text_query_fraction ('text' "
                           "share) must not exceed 1; lower one of them.")
        if self.text_query_fraction > 0 and self.num_text_docs == 0:
            raise _invalid("text_query_fraction", self.text_query_fraction, "0 when num_text_docs == 0",
                           "Text queries need text documents: set num_text_docs >= 1 or "
                           "text_query_fraction=0.")

    @property
    def num_documents(self) -> int:
        """Total number of documents (image + text)."""
        return self.num_image_docs + self.num_text_docs


# ---------------------------------------------------------------------------
# Ids and vocabulary helpers
# ---------------------------------------------------------------------------


def image_doc_id(index: int) -> str:
    """Stable id of image document ``index``.

    Args:
        index: Image document index.

    Returns:
        ``"img-"`` plus the index zero-padded to 9 digits, so ids sort numerically.
    """
    return f"img-{index:09d}"


def text_doc_id(index: int) -> str:
    """Stable id of text document ``index`` (counted among text docs only).

    Args:
        index: Text document index.

    Returns:
        ``"txt-"`` plus the index zero-padded to 9 digits.
    """
    return f"txt-{index:09d}"


def tokenize(text: str) -> list[str]:
    """Lower-case alphabetic word tokens, as used for all vocabulary checks.

    Args:
        text: Any string.

    Returns:
        The list of ``[a-z]+`` tokens of ``text.lower()``.
    """
    return _WORD_RE.findall(text.lower())


def value_words(attribute: str, value: Any) -> frozenset[str]:
    """Words that mention ``value`` of ``attribute`` in captions and queries.

    Args:
        attribute: One of ``ATTRIBUTES``.
        value: A value from ``ATTRIBUTE_VALUES[attribute]``.

    Returns:
        The set of word tokens used to express that value.
    """
    if attribute == "count":
        return frozenset({COUNT_WORDS[int(value)]})
    if attribute == "shape":
        return frozenset({value, SHAPE_PLURALS[value]})
    return frozenset({str(value)})


def attribute_vocabulary(attribute: str) -> frozenset[str]:
    """All words that can express any value of ``attribute``.

    Args:
        attribute: One of ``ATTRIBUTES``.

    Returns:
        Union of ``value_words`` over the attribute's values.
    """
    words: set[str] = set()
    for v in ATTRIBUTE_VALUES[attribute]:
        words |= value_words(attribute, v)
    return frozenset(words)


# ---------------------------------------------------------------------------
# Counter-based attributes
# ---------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic is intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def _uniform(seed: int, stream: int, idx: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) floats that depend only on (seed, stream, idx).

    Args:
        seed: Corpus seed.
        stream: Attribute stream id.
        idx: uint64 document indices.

    Returns:
        float64 array shaped like ``idx``.
    """
    key = np.array([seed, stream], dtype=np.uint64)
    # Hash seed and stream into a per-stream base, then walk the splitmix
    # sequence from that base: value i is mix(base + i * golden).
    base = _splitmix(_splitmix(key[:1]) ^ (key[1:] * _GOLDEN + _GOLDEN))
    h = _splitmix(idx * _GOLDEN + base)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _num_values(cfg: SyntheticConfig, name: str, values: dict[str, tuple]) -> int:
    # The first `num_collections` collections are in use: fewer collections make larger
    # groups of same-caption documents, which only the pixels can tell apart.
    return cfg.num_collections if name == "collection" else len(values[name])


def attribute_arrays(
    cfg: SyntheticConfig, start: int = 0, stop: int | None = None
) -> dict[str, np.ndarray]:
    """Vectorised true attributes of image documents ``start..stop-1``.

    Args:
        cfg: Corpus config.
        start: First image document index.
        stop: One past the last image index; defaults to ``cfg.num_image_docs``.

    Returns:
        Dict with one int8 code array per attribute in ``ATTRIBUTES`` (codes index
        the value tuples; count code ``k`` means ``COUNTS[k]``) and ``"stated"``, a
        bool array of shape ``(n, 4)`` whose columns follow ``OPTIONAL_ATTRIBUTES``.
    """
    stop = cfg.num_image_docs if stop is None else stop
    if not 0 <= start <= stop <= cfg.num_image_docs:
        raise IndexError(f"image range [{start}, {stop}) outside [0, {cfg.num_image_docs})")
    n = stop - start
    out: dict[str, np.ndarray] = {name: np.empty(n, dtype=np.int8) for name in ATTRIBUTES}
    out["stated"] = np.empty((n, len(OPTIONAL_ATTRIBUTES)), dtype=bool)
    # Chunked so a hundred-million-document range does not need GiBs of temporaries.
    for lo in range(0, n, _ARRAY_CHUNK):
        hi = min(n, lo + _ARRAY_CHUNK)
        idx = np.arange(start + lo, start + hi, dtype=np.uint64)
        for name in ATTRIBUTES:
            k = _num_values(cfg, name, ATTRIBUTE_VALUES)
            u = _uniform(cfg.seed, _ATTR_STREAMS[name], idx)
            out[name][lo:hi] = np.minimum((u * k).astype(np.int64), k - 1)
        for j, name in enumerate(OPTIONAL_ATTRIBUTES):
            u = _uniform(cfg.seed, _STATED_STREAMS[name], idx)
            out["stated"][lo:hi, j] = u < cfg.p_caption_states
    return out


def _attrs_from_codes(codes: dict[str, np.ndarray], row: int) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        name: ATTRIBUTE_VALUES[name][int(codes[name][row])] for name in ATTRIBUTES
    }
    attrs["stated"] = tuple(
        name for j, name in enumerate(OPTIONAL_ATTRIBUTES) if codes["stated"][row, j]
    )
    return attrs


def sample_attributes(cfg: SyntheticConfig, index: int) -> dict[str, str | int]:
    """True attributes of image document ``index``, without making any other doc.

    Args:
        cfg: Corpus config.
        index: Image document index in ``[0, cfg.num_image_docs)``.

    Returns:
        ``{"shape", "color", "background", "count" (int), "position", "collection",
        "stated"}``; ``"stated"`` is the tuple of optional attribute names the
        caption states, in ``OPTIONAL_ATTRIBUTES`` order.
    """
    if not 0 <= index < cfg.num_image_docs:
        raise IndexError(f"image index {index} outside [0, {cfg.num_image_docs})")
    return _attrs_from_codes(attribute_arrays(cfg, index, index + 1), 0)


def text_parameter_arrays(
    cfg: SyntheticConfig, start: int = 0, stop: int | None = None
) -> dict[str, np.ndarray]:
    """Vectorised parameters of text documents ``start..stop-1``.

    Same counter-based hash as ``attribute_arrays``, on the text streams, over
    text-document indices (counted among text docs only).

    Args:
        cfg: Corpus config.
        start: First text document index.
        stop: One past the last text index; defaults to ``cfg.num_text_docs``.

    Returns:
        Dict with one int8 code array per name in ``TEXT_PARAMETERS``; code ``k``
        means ``TEXT_PARAMETER_VALUES[name][k]`` (for count, ``TEXT_COUNTS[k]``).
    """
    stop = cfg.num_text_docs if stop is None else stop
    if not 0 <= start <= stop <= cfg.num_text_docs:
        raise IndexError(f"text range [{start}, {stop}) outside [0, {cfg.num_text_docs})")
    n = stop - start
    out = {name: np.empty(n, dtype=np.int8) for name in TEXT_PARAMETERS}
    for lo in range(0, n, _ARRAY_CHUNK):
        hi = min(n, lo + _ARRAY_CHUNK)
        idx = np.arange(start + lo, start + hi, dtype=np.uint64)
        for name in TEXT_PARAMETERS:
            k = _num_values(cfg, name, TEXT_PARAMETER_VALUES)
            u = _uniform(cfg.seed, _TEXT_STREAMS[name], idx)
            out[name][lo:hi] = np.minimum((u * k).astype(np.int64), k - 1)
    return out


def _text_params_from_codes(codes: dict[str, np.ndarray], row: int) -> dict[str, Any]:
    return {name: TEXT_PARAMETER_VALUES[name][int(codes[name][row])] for name in TEXT_PARAMETERS}


def sample_text_parameters(cfg: SyntheticConfig, index: int) -> dict[str, str | int]:
    """Parameters of text document ``index``, without making any other doc.

    Args:
        cfg: Corpus config.
        index: Text document index in ``[0, cfg.num_text_docs)``.

    Returns:
        ``{"topic", "collection", "color", "background", "shape", "count" (int),
        "position"}``, agreeing with ``text_parameter_arrays``.
    """
    if not 0 <= index < cfg.num_text_docs:
        raise IndexError(f"text index {index} outside [0, {cfg.num_text_docs})")
    return _text_params_from_codes(text_parameter_arrays(cfg, index, index + 1), 0)


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------


def _with_article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _noun_phrase(attrs: dict[str, Any], mentioned: set[str] | frozenset[str]) -> str:
    shape = attrs["shape"]
    color = f"{attrs['color']} " if "color" in mentioned else ""
    if "count" in mentioned:
        n = int(attrs["count"])
        noun = shape if n == 1 else SHAPE_PLURALS[shape]
        return f"{COUNT_WORDS[n]} {color}{noun}"
    # "motif" is number-neutral: a plural noun would leak that count > 1.
    return f"the {color}{shape} motif"


def _fill_template(
    template: str,
    attrs: dict[str, Any],
    mentioned: set[str] | frozenset[str],
    bg_phrase: str,
) -> str:
    pos = f" {_POSITION_PHRASES[attrs['position']]}" if "position" in mentioned else ""
    bg = (
        f" {bg_phrase.format(a_bg=_with_article(attrs['background']))}"
        if "background" in mentioned
        else ""
    )
    return template.format(
        np=_noun_phrase(attrs, mentioned), pos=pos, bg=bg, coll=attrs["collection"]
    )


def caption_for(attrs: dict, rng: np.random.Generator | None = None) -> str:
    """Caption of an image document; mentions only the stated attributes.

    Args:
        attrs: Output of ``sample_attributes`` (must include ``"stated"``).
        rng: Generator choosing the template variant; ``None`` uses the first
            variant of each choice.

    Returns:
        A templated English caption stating shape, collection and the attributes
        listed in ``attrs["stated"]``, and no word of any other attribute.
    """
    mentioned = set(ALWAYS_STATED) | set(attrs.get("stated", ()))
    if rng is None:
        t, b = 0, 0
    else:
        t = int(rng.integers(len(_CAPTION_TEMPLATES)))
        b = int(rng.integers(len(_BACKGROUND_PHRASES)))
    text = _fill_template(_CAPTION_TEMPLATES[t], attrs, mentioned, _BACKGROUND_PHRASES[b])
    return text[:1].upper() + text[1:]


def query_text_for(constraints: dict[str, Any], rng: np.random.Generator | None = None) -> str:
    """Query text expressing exactly the given attribute constraints.

    Args:
        constraints: Attribute -> value; must include ``shape`` and ``collection``.
        rng: Generator choosing the template variant; ``None`` uses the first.

    Returns:
        Lower-case templated query text.
    """
    # Unconstrained attributes are never rendered; fill dummies so formatting works.
    attrs = {"color": "", "background": "", "count": 1, "position": "center", **constraints}
    if rng is None:
        t, b = 0, 0
    else:
        t = int(rng.integers(len(_QUERY_TEMPLATES)))
        b = int(rng.integers(len(_BACKGROUND_PHRASES)))
    return _fill_template(_QUERY_TEMPLATES[t], attrs, set(constraints), _BACKGROUND_PHRASES[b])


def text_query_for(constraints: dict[str, Any], rng: np.random.Generator | None = None) -> str:
    """Query text of a ``"text"`` query expressing exactly the given constraints.

    Args:
        constraints: Must hold ``topic`` and ``collection``; may hold ``color``.
        rng: Generator choosing the template variant; ``None`` uses the first.

    Returns:
        Lower-case templated query text naming the topic, collection and (when
        constrained) the colour.
    """
    templates = _TEXT_QUERY_COLOR_TEMPLATES if "color" in constraints else _TEXT_QUERY_TEMPLATES
    t = 0 if rng is None else int(rng.integers(len(templates)))
    return templates[t].format(
        topic=constraints["topic"],
        coll=constraints["collection"],
        color=constraints.get("color", ""),
    )


def text_for(params: dict[str, Any], rng: np.random.Generator | None = None) -> str:
    """Text of a text document with the given parameters.

    Args:
        params: Output of ``sample_text_parameters``.
        rng: Generator choosing the template; ``None`` uses the first.

    Returns:
        One templated sentence naming ``topic``, ``collection`` and ``color`` (and
        no other topic, collection or colour word).
    """
    t = 0 if rng is None else int(rng.integers(len(_TEXT_TEMPLATES)))
    return _TEXT_TEMPLATES[t].format(
        topic=params["topic"],
        coll=params["collection"],
        color=params["color"],
        bg=params["background"],
        a_bg=_with_article(params["background"]),
        shape=params["shape"],
        countw=COUNT_WORDS[int(params["count"])],
        pos=params["position"],
    )


def _text_document(cfg: SyntheticConfig, index: int, params: dict[str, Any]) -> dict[str, Any]:
    text = text_for(params, np.random.default_rng([cfg.seed, _RNG_TEXT, index]))
    return {
        "doc_id": text_doc_id(index),
        "modality": "text",
        "text": text,
        "caption": "",
        "image": None,
        "attributes": json.dumps(params, sort_keys=True),
    }


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon(
            [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)], fill=fill
        )
    elif shape == "cross":
        t = max(1.0, 0.3 * r)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_image(attrs: dict, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw an image document: ``count`` shapes of ``color`` around ``position``.

    Shapes stay inside the central ~82% of the image, so the corners always show
    the background; fills are exact RGB values (no anti-aliasing).

    Args:
        attrs: True attributes (as from ``sample_attributes``).
        size: Side of the square image in pixels.
        rng: Generator for the small size/offset jitter; ``None`` draws the
            nominal, unjittered layout.

    Returns:
        An RGB ``PIL.Image.Image`` of ``size`` x ``size``.
    """
    img = Image.new("RGB", (size, size), BACKGROUND_RGB[attrs["background"]])
    draw = ImageDraw.Draw(img)
    count = int(attrs["count"])
    scale = 1.0 if rng is None else float(rng.uniform(0.85, 1.1))
    r = 0.10 * scale * size
    spacing = 2.4 * r
    fx, fy = _POSITION_CENTERS[attrs["position"]]
    # Left/right clusters stack vertically, the others horizontally, so that a
    # cluster never spills towards the far side of the image.
    vertical = attrs["position"] in ("left", "right")
    fill = COLOR_RGB[attrs["color"]]
    for k in range(count):
        off = (k - (count - 1) / 2) * spacing
        cx, cy = fx * size, fy * size
        if vertical:
            cy += off
        else:
            cx += off
        if rng is not None:
            jx, jy = rng.uniform(-0.025, 0.025, size=2) * size
            cx, cy = cx + jx, cy + jy
        _draw_shape(draw, attrs["shape"], cx, cy, r, fill)
    return img


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------


def _image_document(cfg: SyntheticConfig, index: int, attrs: dict[str, Any]) -> dict[str, Any]:
    caption = caption_for(attrs, np.random.default_rng([cfg.seed, _RNG_CAPTION, index]))
    img = render_image(attrs, cfg.image_size, np.random.default_rng([cfg.seed, _RNG_RENDER, index]))
    true_attrs = {**attrs, "stated": list(attrs["stated"])}
    return {
        "doc_id": image_doc_id(index),
        "modality": "image",
        "text": "",
        "caption": caption,
        "image": _png_bytes(img),
        "attributes": json.dumps(true_attrs, sort_keys=True),
    }


def iter_documents(cfg: SyntheticConfig, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Stream documents ``start..stop-1`` in global order (images, then texts).

    Any range can be produced independently of the rest, so workers can shard the
    corpus by index range and get exactly the rows of the full iteration.

    Args:
        cfg: Corpus config.
        start: First global document index.
        stop: One past the last global index; defaults to (and is clamped to)
            ``cfg.num_documents``.

    Returns:
        Iterator of dicts with keys ``doc_id``, ``modality`` (``"image"`` or
        ``"text"``), ``text`` (``""`` for image docs), ``caption`` (``""`` for text
        docs), ``image`` (PNG bytes or ``None``) and ``attributes`` (JSON string:
        for image docs the true attributes including ``"stated"``; for text docs
        the parameters of ``sample_text_parameters``).
    """
    total = cfg.num_documents
    stop = total if stop is None else min(stop, total)
    if start < 0 or start > stop:
        raise ValueError(f"invalid document range start={start}, stop={stop} (total {total})")
    n_img = cfg.num_image_docs
    # Attribute codes are computed a block at a time: vectorised hashing is far
    # cheaper than one call per document.
    block = 4096
    for lo in range(start, min(stop, n_img), block):
        hi = min(lo + block, stop, n_img)
        codes = attribute_arrays(cfg, lo, hi)
        for row in range(hi - lo):
            yield _image_document(cfg, lo + row, _attrs_from_codes(codes, row))
    for lo in range(max(start, n_img) - n_img, stop - n_img, block):
        hi = min(lo + block, stop - n_img)
        codes = text_parameter_arrays(cfg, lo, hi)
        for row in range(hi - lo):
            yield _text_document(cfg, lo + row, _text_params_from_codes(codes, row))


def describe_image(attrs: dict[str, Any], rng: np.random.Generator | None = None) -> str:
    """Everything an image shows, in words: shape, count, colour, position and
    background (never the collection, which no pixel shows). The text half of the
    image–text pairs that stand in for CLIP's web pretraining.

    Args:
        attrs: True attributes (as from ``sample_attributes``).
        rng: Generator choosing the background phrase; ``None`` takes the first.
    """
    b = 0 if rng is None else int(rng.integers(len(_BACKGROUND_PHRASES)))
    mentioned = frozenset(ATTRIBUTES)
    return _fill_template("{np}{pos}{bg}", attrs, mentioned, _BACKGROUND_PHRASES[b])


def iter_image_text_pairs(
    seed: int, num_pairs: int, image_size: int
) -> Iterator[tuple[Image.Image, str]]:
    """``(image, full description)`` pairs for pretraining a vision tower, drawn from
    the corpus's image distribution but on their own seed stream, so they are disjoint
    from any corpus made with a different seed (like CLIP's pretraining data and
    WebQA). Deterministic by ``seed``.
    """
    cfg = SyntheticConfig(
        seed=seed, num_image_docs=max(num_pairs, 1), num_text_docs=0, num_queries=(0, 0, 0),
        image_size=image_size, complementary_fraction=0.0, text_query_fraction=0.0, p_caption_states=1.0,
    )
    block = 4096
    for lo in range(0, num_pairs, block):
        hi = min(lo + block, num_pairs)
        codes = attribute_arrays(cfg, lo, hi)
        for row in range(hi - lo):
            attrs = _attrs_from_codes(codes, row)
            i = lo + row
            image = render_image(attrs, image_size, np.random.default_rng([seed, _RNG_RENDER, i]))
            yield image, describe_image(attrs, np.random.default_rng([seed, _RNG_CAPTION, i]))


def iter_document_batches(
    cfg: SyntheticConfig, batch_size: int = 1024, start: int = 0, stop: int | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream documents as Arrow record batches with ``DOCUMENT_SCHEMA``.

    Args:
        cfg: Corpus config.
        batch_size: Maximum rows per batch (the last may be shorter).
        start: First global document index.
        stop: One past the last global index (``None`` for all).

    Returns:
        Iterator of ``pa.RecordBatch`` with the same rows, in the same order, as
        ``iter_documents(cfg, start, stop)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    names = DOCUMENT_SCHEMA.names
    cols: dict[str, list[Any]] = {name: [] for name in names}
    n = 0
    for doc in iter_documents(cfg, start, stop):
        for name in names:
            cols[name].append(doc[name])
        n += 1
        if n == batch_size:
            yield pa.RecordBatch.from_pydict(cols, schema=DOCUMENT_SCHEMA)
            cols = {name: [] for name in names}
            n = 0
    if n:
        yield pa.RecordBatch.from_pydict(cols, schema=DOCUMENT_SCHEMA)


# ---------------------------------------------------------------------------
# Queries and relevance
# ---------------------------------------------------------------------------


class _RelevanceIndex:
    """Finds every document whose codes satisfy a constraint set.

    Every query constrains the two ``keys`` (shape and collection for image
    queries, topic and collection for text queries), so docs are bucketed by that
    pair once (one argsort); each query then filters only its bucket, which keeps
    per-query cost proportional to the bucket, not to the corpus.
    """

    def __init__(
        self,
        codes: dict[str, np.ndarray],
        values: dict[str, tuple[Any, ...]],
        keys: tuple[str, str],
    ) -> None:
        self.codes, self.values, self.keys = codes, values, keys
        n_second = len(values[keys[1]])
        key = codes[keys[0]].astype(np.int32) * n_second + codes[keys[1]].astype(np.int32)
        # Stable sort keeps indices ascending inside a bucket, so results come out
        # sorted (and zero-padded ids sort the same way).
        self.order = np.argsort(key, kind="stable")
        self.bounds = np.searchsorted(
            key[self.order], np.arange(len(values[keys[0]]) * n_second + 1)
        )

    def positives(self, constraints: dict[str, Any]) -> np.ndarray:
        first, second = self.keys
        i = self.values[first].index(constraints[first])
        j = self.values[second].index(constraints[second])
        b = i * len(self.values[second]) + j
        idx = self.order[self.bounds[b] : self.bounds[b + 1]]
        mask = np.ones(len(idx), dtype=bool)
        for name, value in constraints.items():
            if name in self.keys:
                continue
            mask &= self.codes[name][idx] == self.values[name].index(value)
        return idx[mask]


def relevant_indices(codes: dict[str, np.ndarray], constraints: dict[str, Any]) -> np.ndarray:
    """All image indices whose true attributes satisfy every constraint.

    Args:
        codes: Output of ``attribute_arrays`` over the whole image range.
        constraints: Attribute -> value (any subset of ``ATTRIBUTES``).

    Returns:
        Sorted int64 array of matching image document indices.
    """
    return _matching(codes, constraints, ATTRIBUTE_VALUES)


def relevant_text_indices(codes: dict[str, np.ndarray], constraints: dict[str, Any]) -> np.ndarray:
    """All text document indices whose parameters satisfy every constraint.

    Args:
        codes: Output of ``text_parameter_arrays`` over the whole text range.
        constraints: Parameter -> value (any subset of ``TEXT_PARAMETERS``).

    Returns:
        Sorted int64 array of matching text document indices.
    """
    return _matching(codes, constraints, TEXT_PARAMETER_VALUES)


def _matching(codes: dict[str, np.ndarray], constraints: dict[str, Any], values: dict[str, tuple]) -> np.ndarray:
    # Brute force over every row: the reference the bucketed index is checked against.
    mask = np.ones(len(next(iter(codes.values()))), dtype=bool)
    for name, value in constraints.items():
        mask &= codes[name] == values[name].index(value)
    return np.flatnonzero(mask)


def _make_text_query(params: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Constraints of a ``"text"`` query on a text document's parameters."""
    use = set(TEXT_QUERY_KEYS)
    if rng.random() < _P_TEXT_COLOR:
        use.add("color")
    return {name: params[name] for name in TEXT_PARAMETERS if name in use}


def _make_query(
    attrs: dict[str, Any], kind: str, rng: np.random.Generator
) -> dict[str, Any] | None:
    """Constraints for a query on ``attrs``, or None if ``kind`` is impossible."""
    stated = set(attrs["stated"])
    use = set(ALWAYS_STATED) | stated
    if kind == "image":
        unstated = [a for a in OPTIONAL_ATTRIBUTES if a not in stated]
        if not unstated:
            return None
        k = 2 if len(unstated) > 1 and rng.random() < _P_TWO_COMPLEMENTS else 1
        w = np.array([_COMPLEMENT_WEIGHTS[a] for a in unstated])
        picks = rng.choice(len(unstated), size=k, replace=False, p=w / w.sum())
        use |= {unstated[int(p)] for p in picks}
    # Canonical attribute order keeps the constraints dict stable across runs.
    return {name: attrs[name] for name in ATTRIBUTES if name in use}


def _kind_counts(cfg: SyntheticConfig, n: int) -> tuple[int, int, int]:
    """Exact ``(n_caption, n_image, n_text)`` for a split of ``n`` queries."""
    n_image = int(round(cfg.complementary_fraction * n))
    # Both fractions can round up (e.g. 0.3 and 0.7 of 5); the image count keeps
    # its exact meaning and text takes what is left.
    n_text = min(int(round(cfg.text_query_fraction * n)), n - n_image)
    return n - n_image - n_text, n_image, n_text


def _stated_by_a_positive(
    codes: dict[str, np.ndarray], positives: np.ndarray, constraints: dict[str, Any], target: dict
) -> bool:
    """Whether some relevant document's caption states an attribute the query asks for
    beyond its target's caption: then the caption text alone could answer the query."""
    asked = [a for a in constraints if a in OPTIONAL_ATTRIBUTES and a not in target["stated"]]
    cols = [OPTIONAL_ATTRIBUTES.index(a) for a in asked]
    return bool(codes["stated"][positives][:, cols].any())


def _draw_query(
    kind: str, cfg: SyntheticConfig, rng: np.random.Generator, codes: dict[str, np.ndarray],
    index: _RelevanceIndex, text_codes: dict[str, np.ndarray],
) -> tuple[int, dict[str, Any], str] | None:
    """One attempt at a query of ``kind``: (target index, constraints, text), or None when
    the drawn target cannot carry such a query (the caller draws again)."""
    if kind == "text":
        target = int(rng.integers(cfg.num_text_docs))
        constraints = _make_text_query(_text_params_from_codes(text_codes, target), rng)
        return target, constraints, text_query_for(constraints, rng)
    target = int(rng.integers(cfg.num_image_docs))
    attrs = _attrs_from_codes(codes, target)
    constraints = _make_query(attrs, kind, rng)
    if constraints is None:
        return None
    if kind == "image" and cfg.strict_complementary and _stated_by_a_positive(
        codes, index.positives(constraints), constraints, attrs
    ):
        return None
    return target, constraints, query_text_for(constraints, rng)


def generate_queries(cfg: SyntheticConfig) -> dict[str, list[dict]]:
    """Generate train/dev/test queries with exhaustive binary relevance.

    Works from attribute and text-parameter arrays only (no rendering). Kinds are
    assigned exactly per split of ``n`` queries: ``round(complementary_fraction * n)``
    are ``"image"``, ``round(text_query_fraction * n)`` are ``"text"`` (capped at
    what the image queries leave) and the rest ``"caption"``. Splits are generated
    test, dev, train, each from its own seeded stream, so the test set does not
    change when train/dev counts change. Query texts are unique across all splits;
    a repeated text is retried with a different target. With ``cfg.num_composed``, each
    split's composed queries (:func:`generate_composed_queries`, kind ``"composed"``)
    follow its other queries, which stay exactly what they are without them.

    Args:
        cfg: Corpus config.

    Returns:
        ``{"train": [...], "dev": [...], "test": [...]}``; each query is a dict with
        ``qid`` (e.g. ``"train-000012"``), ``split``, ``query``, ``kind``
        (``"caption"``, ``"image"`` or ``"text"``), ``target_doc_id`` (an image doc
        for caption/image queries, a text doc for text queries),
        ``positive_doc_ids`` (sorted ids of all relevant docs: image docs only for
        caption/image queries, text docs only for text queries) and
        ``constraints`` (attribute -> value with count as int; for text queries
        ``topic``, ``collection`` and possibly ``color``).
    """
    codes = attribute_arrays(cfg)
    index = _RelevanceIndex(codes, ATTRIBUTE_VALUES, ("shape", "collection"))
    text_codes = text_parameter_arrays(cfg)
    text_index = _RelevanceIndex(text_codes, TEXT_PARAMETER_VALUES, TEXT_QUERY_KEYS)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split_no in (2, 1, 0):
        split = SPLITS[split_no]
        n = int(cfg.num_queries[split_no])
        rng = np.random.default_rng([cfg.seed, _RNG_QUERIES, split_no])
        n_caption, n_image, n_text = _kind_counts(cfg, n)
        kinds = np.array(["image"] * n_image + ["text"] * n_text + ["caption"] * n_caption)
        rng.shuffle(kinds)
        queries: list[dict] = []
        max_attempts = 1000 + 100 * n
        attempts = 0
        for kind in map(str, kinds):
            while True:
                attempts += 1
                if attempts > max_attempts:
                    raise RuntimeError(
                        f"could not find {n} unique {split} queries after {max_attempts} "
                        f"attempts; the corpus (num_image_docs={cfg.num_image_docs}, "
                        f"num_text_docs={cfg.num_text_docs}, "
                        f"p_caption_states={cfg.p_caption_states}) is too small for "
                        f"num_queries={cfg.num_queries}"
                    )
                drawn = _draw_query(kind, cfg, rng, codes, index, text_codes)
                if drawn is not None and drawn[2] not in seen:
                    break
            target, constraints, text = drawn
            seen.add(text)
            if kind == "text":
                target_id = text_doc_id(target)
                positive_ids = [text_doc_id(int(i)) for i in text_index.positives(constraints)]
            else:
                target_id = image_doc_id(target)
                positive_ids = [image_doc_id(int(i)) for i in index.positives(constraints)]
            queries.append(
                {
                    "qid": f"{split}-{len(queries):06d}",
                    "split": split,
                    "query": text,
                    "kind": kind,
                    "target_doc_id": target_id,
                    "positive_doc_ids": positive_ids,
                    "constraints": constraints,
                }
            )
        out[split] = queries
        logger.debug("generated %d %s queries in %d attempts", len(queries), split, attempts)
    if any(cfg.num_composed):
        composed = generate_composed_queries(cfg, codes)
        for split in SPLITS:
            out[split].extend(composed[split])
    return {split: out[split] for split in SPLITS}


def modification_text(attribute: str, value: Any, rng: np.random.Generator | None = None) -> str:
    """The modification text of a composed query that changes ``attribute`` to ``value``:
    it names the new value and no other word of any attribute vocabulary."""
    templates = _MODIFICATION_TEMPLATES[attribute]
    t = 0 if rng is None else int(rng.integers(len(templates)))
    word = COUNT_WORDS[int(value)] if attribute == "count" else str(value)
    return templates[t].format(value=word, a_value=_with_article(word))


def generate_composed_queries(
    cfg: SyntheticConfig, codes: dict[str, np.ndarray] | None = None,
) -> dict[str, list[dict]]:
    """Composed queries (kind ``"composed"``): a reference image document and a modification
    text that changes one attribute the reference's caption does not state (colour,
    background or count), with exhaustive relevance from the ground truth.

    The targets are every image document that shows the reference's content
    (``COMPOSED_CONTENT``: shape, colour, background and count) with the one attribute
    changed to the new value; position and collection are free (the query names neither,
    and no pixel shows a collection). The *near misses* are the documents that match the
    reference's content unchanged (the reference itself first): what an image-only search
    finds, and the hard negatives of training. A draw without any target is drawn again;
    ``(reference, attribute, value)`` is unique across splits. Splits are made test, dev,
    train, each on its own stream (``_RNG_COMPOSED``), independent of ``num_queries``.

    Args:
        cfg: Corpus config (``num_composed`` per split).
        codes: ``attribute_arrays(cfg)`` when the caller has them.

    Returns:
        ``{"train": [...], "dev": [...], "test": [...]}``; each query is a dict with
        ``qid`` (``"<split>-c000012"``), ``split``, ``query`` (the modification text),
        ``kind`` (``"composed"``), ``reference_doc_id``, ``target_doc_id`` (the first
        target), ``positive_doc_ids`` (sorted), ``near_miss_doc_ids`` (sorted, reference
        first, at most ``MAX_NEAR_MISSES``), ``changed`` (``{"attribute", "from", "to"}``)
        and ``constraints`` (the targets' attributes, count as int).

    Raises:
        RuntimeError: the corpus is too small to hold that many composed queries.
    """
    codes = attribute_arrays(cfg) if codes is None else codes
    index = _RelevanceIndex(codes, ATTRIBUTE_VALUES, ("shape", "color"))
    seen: set[tuple[int, str, Any]] = set()
    out: dict[str, list[dict]] = {}
    for split_no in (2, 1, 0):
        split = SPLITS[split_no]
        n = int(cfg.num_composed[split_no])
        rng = np.random.default_rng([cfg.seed, _RNG_COMPOSED, split_no])
        queries: list[dict] = []
        max_attempts = 1000 + 200 * n
        attempts = 0
        while len(queries) < n:
            attempts += 1
            if attempts > max_attempts:
                raise RuntimeError(
                    f"could not find {n} composed {split} queries with a target after {max_attempts} "
                    f"attempts; the corpus (num_image_docs={cfg.num_image_docs}) is too small for "
                    f"num_composed={cfg.num_composed}: add image documents or ask for fewer")
            ref = int(rng.integers(cfg.num_image_docs))
            attrs = _attrs_from_codes(codes, ref)
            changeable = [a for a in COMPOSED_CHANGES if a not in attrs["stated"]]
            if not changeable:
                continue
            attribute = changeable[int(rng.integers(len(changeable)))]
            values = [v for v in ATTRIBUTE_VALUES[attribute] if v != attrs[attribute]]
            value = values[int(rng.integers(len(values)))]
            text = modification_text(attribute, value, rng)
            if (ref, attribute, value) in seen:
                continue
            content = {name: attrs[name] for name in COMPOSED_CONTENT}
            constraints = {**content, attribute: value}
            positives = index.positives(constraints)
            if not len(positives):
                continue
            seen.add((ref, attribute, value))
            near = [int(i) for i in index.positives(content) if int(i) != ref]
            queries.append({
                "qid": f"{split}-c{len(queries):06d}",
                "split": split,
                "query": text,
                "kind": COMPOSED_KIND,
                "reference_doc_id": image_doc_id(ref),
                "target_doc_id": image_doc_id(int(positives[0])),
                "positive_doc_ids": [image_doc_id(int(i)) for i in positives],
                "near_miss_doc_ids": [image_doc_id(i) for i in [ref, *near][:MAX_NEAR_MISSES]],
                "changed": {"attribute": attribute, "from": attrs[attribute], "to": value},
                "constraints": {name: constraints[name] for name in ATTRIBUTES if name in constraints},
            })
        out[split] = queries
        logger.debug("generated %d composed %s queries in %d attempts", len(queries), split, attempts)
    return {split: out[split] for split in SPLITS}


def attach_query_images(cfg: SyntheticConfig, queries: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """``queries`` (``generate_queries`` output) with ``image`` set on every composed query:
    its reference document's PNG bytes (as ingest stores them with the query). In place;
    returns ``queries``."""
    for split in queries.values():
        for q in split:
            if q["kind"] == COMPOSED_KIND and "image" not in q:
                q["image"] = document_image(cfg, q["reference_doc_id"])
    return queries


def document_image(cfg: SyntheticConfig, doc_id: str) -> bytes:
    """The PNG bytes of image document ``doc_id`` (exactly the corpus's), rendered alone:
    the picture of a composed query's reference."""
    if not doc_id.startswith("img-"):
        raise ValueError(f"{doc_id!r} is not an image document id (img-NNNNNNNNN)")
    index = int(doc_id[4:])
    return _image_document(cfg, index, sample_attributes(cfg, index))["image"]


def write_qrels(queries: list[dict]) -> list[tuple[str, str, int]]:
    """TREC-style binary qrels rows for a list of queries.

    Args:
        queries: Query dicts as returned by ``generate_queries`` (one split or many).

    Returns:
        ``(qid, doc_id, 1)`` for every positive of every query, in query order.
    """
    return [(q["qid"], doc_id, 1) for q in queries for doc_id in q["positive_doc_ids"]]
