"""The processor: query-minus-caption, special tokens, the image-document layout and its
masks, image transforms, and training-batch collation (CIEA_METHOD.md, "Documents and
queries" and "Losses")."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ciea_model import CIEAProcessor, Document, TrainExample
from ciea_model.config import CLIP_MEAN, CLIP_STD
from ciea_model.processor import (
    CAPTION_PREFIX,
    IM_END,
    IM_PATCH,
    IM_START,
    SPECIAL_TOKENS,
    ImageTransform,
    doc_key,
)

SIZE = 32
# univl-dr's text tower is CLIP's text encoder (CLIPTextConfig keyword arguments).
CLIP_TEXT = {"model_type": "clip_text_model", "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.fixture
def make_processor(make_config, tokenizer_dirs, tiny):
    """``make_processor(variant="ciea", family="t5")`` without building a model."""

    def make(variant: str = "ciea", family: str = "t5", **kwargs) -> CIEAProcessor:
        if variant == "univl-dr":
            kwargs.setdefault("text_overrides", {"hf_config": dict(CLIP_TEXT)})
        cfg = make_config(variant, family, **kwargs)
        tok = AutoTokenizer.from_pretrained(tokenizer_dirs[tiny.tokenizer_style[family]])
        return CIEAProcessor(tok, cfg, image_size=SIZE, num_patches=tiny.num_patches)

    return make


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _solid(rgb, size=(SIZE, SIZE)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def _image_doc(doc_id: str, caption: str, rgb=(200, 10, 10)) -> Document:
    return Document(doc_id, "image", caption=caption, image=_png(_solid(rgb)))


def _text_doc(doc_id: str, text: str) -> Document:
    return Document(doc_id, "text", text=text)


# --------------------------------------------------------------------------- query minus caption


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_query_minus_caption(family, make_processor):
    proc = make_processor(family=family)
    qmc = proc.query_minus_caption
    assert qmc("a red circle from the harbor", ["a circle from the harbor collection"]) == "red"
    # Every query word is in the caption: nothing is left.
    assert qmc("a circle from the harbor", ["a circle from the harbor collection"]) is None
    assert qmc("", ["a circle"]) is None
    # Several captions: the union of their tokens is removed.
    query = "a red circle on the left from the harbor"
    assert qmc(query, ["a circle from the harbor collection"]) == "red on left"
    assert qmc(query, ["a circle from the harbor collection", "on the left"]) == "red"
    assert qmc(query, ["a circle from the harbor collection", "on the left", "red"]) is None
    # No caption: the query comes back unchanged (re-tokenised, lower-cased).
    assert qmc("A Red Circle", []) == "a red circle"


# --------------------------------------------------------------------------- special tokens


def _bare_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "</s>", "a", "red", "circle"])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"unk_token": "[UNK]", "eos_token": "</s>"}
    if with_pad:
        kwargs["pad_token"] = "[PAD]"
    return PreTrainedTokenizerFast(tokenizer_object=raw, **kwargs)


def test_special_tokens_are_added_once(make_config, tiny):
    tok = _bare_tokenizer()
    assert not set(SPECIAL_TOKENS) & set(tok.get_vocab())
    cfg = make_config()
    proc = CIEAProcessor(tok, cfg, image_size=SIZE, num_patches=tiny.num_patches)
    assert len(proc) == len(tok) == 6 + len(SPECIAL_TOKENS)
    ids = (proc.im_start_id, proc.im_end_id, proc.im_patch_id)
    assert len(set(ids)) == 3 and min(ids) >= 6
    assert tok.convert_ids_to_tokens(list(ids)) == [IM_START, IM_END, IM_PATCH]
    # Re-creating a processor on the same tokenizer does not grow it.
    again = CIEAProcessor(tok, cfg, image_size=SIZE, num_patches=tiny.num_patches)
    assert len(again) == len(proc) == len(tok)
    assert (again.im_start_id, again.im_end_id, again.im_patch_id) == ids
    # They are special: a decoded image sequence drops them.
    assert tok.decode([proc.im_start_id, 3, proc.im_end_id], skip_special_tokens=True) == "a"


def test_offline_tokenizer_has_the_special_tokens_already(make_processor, tokenizer_dirs):
    proc = make_processor()
    fresh = AutoTokenizer.from_pretrained(tokenizer_dirs["t5"])
    assert len(proc) == len(fresh)


def test_missing_pad_token_falls_back_to_eos(make_config, tiny):
    tok = _bare_tokenizer(with_pad=False)
    proc = CIEAProcessor(tok, make_config("ciea", "gpt2"), image_size=SIZE, num_patches=4)
    assert tok.pad_token == "</s>" and proc.pad_id == tok.convert_tokens_to_ids("</s>")
    assert tok.padding_side == "right"
    enc = proc.tokenize(["a", "a red circle"])
    assert enc["input_ids"][0, 1:].tolist() == [proc.pad_id] * 2
    assert enc["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]


# --------------------------------------------------------------------------- image sequence layout


def _ids(proc: CIEAProcessor, text: str) -> list[int]:
    return proc.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_image_sequence_layout_and_masks(family, make_processor, tiny):
    proc = make_processor(family=family)
    tok = proc.tokenizer
    n = tiny.num_patches
    captions = ["a circle from the harbor collection", "a red circle"]
    out = proc.collate_image_sequences(captions)
    ids, attn = out["input_ids"], out["attention_mask"]
    if family == "bert":
        prefix, suffix = [tok.cls_token_id], [tok.sep_token_id]
    else:  # T5: no leading special, </s> at the end
        prefix, suffix = [], [tok.eos_token_id]
    assert proc._prefix == prefix
    p0 = len(prefix) + 1  # first patch position
    for i, caption in enumerate(captions):
        row = ids[i, : int(attn[i].sum())].tolist()
        body = _ids(proc, CAPTION_PREFIX + caption)
        expected = prefix + [proc.im_start_id] + [proc.im_patch_id] * n + [proc.im_end_id]
        expected += body + suffix
        assert row == expected
        assert _ids(proc, CAPTION_PREFIX)[:2] == body[:2]  # "caption", ":"
        # Padding only after the real tokens.
        assert attn[i].tolist() == [1] * len(row) + [0] * (ids.shape[1] - len(row))
        assert ids[i, len(row):].tolist() == [proc.pad_id] * (ids.shape[1] - len(row))
        # Patch mask: exactly the N placeholders.
        pm = out["patch_mask"][i]
        assert int(pm.sum()) == n
        assert pm.nonzero().flatten().tolist() == list(range(p0, p0 + n))
        assert (ids[i][pm] == proc.im_patch_id).all()
        # Caption mask: <im_end> "caption:" caption… end special, padding excluded.
        cm = out["caption_mask"][i]
        first = int(cm.nonzero()[0])
        assert ids[i, first] == proc.im_end_id and first == p0 + n
        assert cm.nonzero().flatten().tolist() == list(range(first, len(row)))
        assert not (cm & pm).any()
    assert out["caption_mask"][1].sum() < out["caption_mask"][0].sum()  # shorter caption
    # The image-only sequence: prefix + <im_start> + N×<im_patch> + <im_end>, no padding.
    io_row = prefix + [proc.im_start_id] + [proc.im_patch_id] * n + [proc.im_end_id]
    assert out["io_input_ids"].tolist() == [io_row, io_row]
    assert out["io_attention_mask"].tolist() == [[1] * len(io_row)] * 2
    assert out["io_patch_mask"].sum(1).tolist() == [n, n]
    assert (out["io_input_ids"][out["io_patch_mask"]] == proc.im_patch_id).all()


def test_long_captions_are_truncated(make_processor, tiny):
    proc = make_processor(text_overrides={"max_length": 10})
    out = proc.collate_image_sequences([" ".join(["red circle"] * 50)])
    assert out["input_ids"].shape[1] == 10 + tiny.num_patches + 2
    assert out["input_ids"][0, -1] == proc.tokenizer.eos_token_id  # end special kept
    assert proc.tokenize(["a " * 50])["input_ids"].shape[1] == 10


# --------------------------------------------------------------------------- image transform


def _expected_pixels(rgb) -> torch.Tensor:
    value = (np.asarray(rgb, dtype=np.float32) / 255.0 - np.asarray(CLIP_MEAN, dtype=np.float32))
    value = value / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(value).view(3, 1, 1).expand(3, SIZE, SIZE)


def test_image_transform_from_pil_and_png_bytes():
    tf = ImageTransform(SIZE, CLIP_MEAN, CLIP_STD)
    rgb = (250, 128, 3)
    from_pil = tf(_solid(rgb))
    assert from_pil.shape == (3, SIZE, SIZE) and from_pil.dtype == torch.float32
    torch.testing.assert_close(from_pil, _expected_pixels(rgb))
    torch.testing.assert_close(tf(_png(_solid(rgb))), from_pil)
    torch.testing.assert_close(tf(bytearray(_png(_solid(rgb)))), from_pil)
    # Larger, greyscale and RGBA inputs end up (3, S, S) too.
    assert tf(_solid(rgb, (100, 100))).shape == (3, SIZE, SIZE)
    torch.testing.assert_close(tf(_solid(rgb, (64, 64))), from_pil, atol=1e-5, rtol=0)
    grey = tf(Image.new("L", (SIZE, SIZE), 77))
    torch.testing.assert_close(grey, _expected_pixels((77, 77, 77)))
    rgba = tf(Image.new("RGBA", (SIZE, SIZE), (*rgb, 255)))
    torch.testing.assert_close(rgba, from_pil)
    # An already transformed tensor passes through untouched.
    t = torch.randn(3, SIZE, SIZE)
    assert tf(t) is t


def _three_bands(width: int, height: int) -> Image.Image:
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    arr[:, :third] = (255, 0, 0)
    arr[:, third : 2 * third] = (0, 255, 0)
    arr[:, 2 * third :] = (0, 0, 255)
    return Image.fromarray(arr)


def test_non_square_image_is_centre_cropped():
    tf = ImageTransform(SIZE, CLIP_MEAN, CLIP_STD)
    # 96×32: the short side is already S, so the crop is exactly the green middle third.
    torch.testing.assert_close(tf(_three_bands(96, SIZE)), _expected_pixels((0, 255, 0)))
    # Portrait (32×96 rotated): the middle third of the height.
    tall = _three_bands(96, SIZE).transpose(Image.Transpose.ROTATE_90)
    assert tall.size == (SIZE, 96)
    torch.testing.assert_close(tf(tall), _expected_pixels((0, 255, 0)))
    # 192×64 is first resized (short side → 32, i.e. 96×32), then cropped: green inside.
    out = tf(_three_bands(192, 64))
    assert out.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(out[:, :, 4:-4], _expected_pixels((0, 255, 0))[:, :, 4:-4])


# --------------------------------------------------------------------------- documents


def test_document_validation():
    with pytest.raises(ValueError, match="modality='video'"):
        Document("d", "video", text="x")
    with pytest.raises(ValueError, match="no image given"):
        Document("d", "image", caption="x")


def test_doc_key_is_stable_and_distinct():
    assert doc_key("img-1") == doc_key("img-1")
    assert doc_key("img-1") != doc_key("img-2")
    assert -(2**63) <= doc_key("img-1") < 2**63
    # Pinned: keys must agree across processes and runs (unlike the salted built-in hash).
    assert doc_key("img-1") == 7165690690956712260


def test_collate_documents_ciea_layout(make_processor, tiny):
    proc = make_processor("ciea")
    docs = [_text_doc("t1", "the harbor"), _image_doc("i1", "a red circle"), _text_doc("t2", "zoo")]
    batch = proc.collate_documents(docs)
    assert batch.size == 3
    assert batch.text_index.tolist() == [0, 2] and batch.image_index.tolist() == [1]
    assert batch.text["input_ids"].tolist() == proc.tokenize(["the harbor", "zoo"])["input_ids"].tolist()
    assert batch.image["pixel_values"].shape == (1, 3, SIZE, SIZE)
    assert int(batch.image["patch_mask"].sum()) == tiny.num_patches
    assert {"caption_mask", "io_input_ids", "io_patch_mask"} <= set(batch.image)
    only_text = proc.collate_documents([docs[0]])
    assert only_text.image is None and only_text.image_index.numel() == 0
    with pytest.raises(ValueError, match="empty batch"):
        proc.collate_documents([])


def test_text_only_variant_lays_image_documents_out_as_text(make_processor):
    proc = make_processor("text-only")
    docs = [_image_doc("i1", "a red circle"), _text_doc("t1", "the harbor")]
    batch = proc.collate_documents(docs)
    assert batch.image is None
    assert batch.text_index.tolist() == [0, 1]
    assert batch.text["input_ids"].tolist() == proc.tokenize(["a red circle", "the harbor"])["input_ids"].tolist()


def test_univl_dr_lays_image_documents_out_as_caption_text_plus_pixels(make_processor):
    proc = make_processor("univl-dr")
    batch = proc.collate_documents([_image_doc("i1", "a red circle"), _text_doc("t1", "zoo")])
    assert batch.image_index.tolist() == [0] and batch.text_index.tolist() == [1]
    assert set(batch.image) == {"input_ids", "attention_mask", "pixel_values"}
    # The bare caption, as UniVL-DR's release feeds it to CLIP (no "caption:" prefix).
    expected = proc.tokenize(["a red circle"])
    assert batch.image["input_ids"].tolist() == expected["input_ids"].tolist()
    assert proc.im_patch_id not in batch.image["input_ids"].flatten().tolist()
    assert batch.image["pixel_values"].shape == (1, 3, SIZE, SIZE)


# --------------------------------------------------------------------------- training batches


def _examples() -> list[TrainExample]:
    harbor = _image_doc("img-harbor", "a circle from the harbor collection")
    garden = _image_doc("img-garden", "a green square at the top, from the garden collection")
    text = _text_doc("txt-1", "the harbor guide lists two benches")
    return [
        # q0 and q1 share a positive; q1 says nothing beyond its caption (skipped for L_comp).
        TrainExample("q0", "a red circle from the harbor", harbor,
                     relevant_ids=frozenset({"img-harbor", "img-garden"})),
        TrainExample("q1", "a circle from the harbor", harbor,
                     relevant_ids=frozenset({"img-harbor"})),
        TrainExample("q2", "a red circle on the left from the harbor", garden,
                     negatives=(harbor, text),
                     relevant_ids=frozenset({"img-garden"}),
                     positive_captions=("a circle from the harbor collection", "on the left")),
        # A text positive: no complementary loss.
        TrainExample("q3", "the harbor benches", text, relevant_ids=frozenset({"txt-1"})),
    ]


def test_collate_training_deduplicates_and_flags_relevant_candidates(make_processor):
    proc = make_processor("ciea")
    batch = proc.collate_training(_examples())
    # Positives first (in query order, de-duplicated), then new hard negatives.
    assert batch.doc_ids == ["img-harbor", "img-garden", "txt-1"]
    assert batch.targets.tolist() == [0, 0, 1, 2]  # q0 and q1 share the same index
    assert batch.doc_keys.tolist() == [doc_key(d) for d in batch.doc_ids]
    assert batch.documents.size == 3
    assert batch.documents.image_index.tolist() == [0, 1]
    assert batch.documents.text_index.tolist() == [2]
    # Ignore: q0's other relevant document (img-garden) is in the batch; targets never are.
    assert batch.ignore.tolist() == [
        [False, True, False],
        [False, False, False],
        [False, False, False],
        [False, False, False],
    ]
    assert batch.queries["input_ids"].shape[0] == 4


def test_collate_training_complementary_queries(make_processor):
    proc = make_processor("ciea")
    batch = proc.collate_training(_examples())
    # q0: "red" (its caption covers the rest); q1: fully covered → skipped and counted;
    # q2: both positive captions removed → "red"; q3: text positive → not eligible.
    assert batch.stats == {"comp_eligible": 3, "comp_skipped": 1}
    assert batch.comp_queries["input_ids"].tolist() == proc.tokenize(["red", "red"])["input_ids"].tolist()
    # Targets index the image sub-batch: img-harbor is image row 0, img-garden row 1.
    assert batch.comp_targets.tolist() == [0, 1]
    moved = batch.to("cpu")
    assert moved.stats == batch.stats and torch.equal(moved.comp_targets, batch.comp_targets)


@pytest.mark.parametrize("variant", ["marvel", "ciea-no-comp", "text-only", "univl-dr"])
def test_no_complementary_queries_without_the_loss(variant, make_processor):
    batch = make_processor(variant).collate_training(_examples())
    assert batch.comp_queries is None and batch.comp_targets is None
    assert batch.targets.tolist() == [0, 0, 1, 2]


def test_ciea_no_cie_keeps_the_complementary_loss(make_processor):
    batch = make_processor("ciea-no-cie").collate_training(_examples())
    assert batch.comp_targets.tolist() == [0, 1]


def test_all_comp_queries_skipped(make_processor):
    proc = make_processor("ciea")
    harbor = _image_doc("img-harbor", "a circle from the harbor collection")
    batch = proc.collate_training([TrainExample("q", "a circle from the harbor", harbor)])
    assert batch.comp_queries is None and batch.comp_targets is None
    assert batch.stats == {"comp_eligible": 1, "comp_skipped": 1}


# --------------------------------------------------------------------------- offline tokenizer


@pytest.mark.parametrize("style", ["t5", "bert"])
def test_offline_tokenizer_round_trips_through_save_pretrained(style, tokenizer_dirs):
    tok = AutoTokenizer.from_pretrained(tokenizer_dirs[style])
    ids = tok("A Red Circle")["input_ids"]
    words = [tok.convert_ids_to_tokens(i) for i in ids]
    if style == "t5":
        assert words == ["a", "red", "circle", "</s>"] and tok.pad_token_id == 0
    else:
        assert words == ["[CLS]", "a", "red", "circle", "[SEP]"] and tok.pad_token_id == 0
    for special in SPECIAL_TOKENS:
        assert special in tok.get_vocab()
        assert tok.tokenize(f"x {special} y")[1] == special  # never split


def test_offline_tokenizer_rejects_unknown_style(tmp_path):
    from ciea_model.tokenizer import train_wordpiece_tokenizer

    with pytest.raises(ValueError, match=r"style='gpt'"):
        train_wordpiece_tokenizer(["a b c"], tmp_path, style="gpt")
