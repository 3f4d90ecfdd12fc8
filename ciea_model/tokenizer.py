"""Offline tokenizers for random-init text towers.

A random-init LM still needs a tokenizer, and the hub is not reachable in tests or in the
offline demo: this trains a small WordPiece tokenizer on the caller's texts (milliseconds
on a synthetic corpus) and saves it with ``save_pretrained`` so it loads like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from .processor import SPECIAL_TOKENS

# Special-token layouts of the two LM families we build at random: T5 appends </s> and pads
# with id 0 (its decoder start); BERT wraps the text in [CLS] … [SEP].
_STYLES = {
    "t5": {"pad": "<pad>", "eos": "</s>", "unk": "<unk>", "template": "$A </s>"},
    "bert": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "template": "[CLS] $A [SEP]"},
}


def train_wordpiece_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000, style: str = "t5"
) -> PreTrainedTokenizerFast:
    """Trains a lower-casing WordPiece tokenizer and saves it to ``out_dir``.

    Args:
        texts: training texts (captions, documents, queries).
        out_dir: directory written with ``save_pretrained``.
        vocab_size: target vocabulary size (the special tokens included).
        style: ``"t5"`` (…</s>, pad id 0) or ``"bert"`` ([CLS] … [SEP]).

    Returns:
        The tokenizer, with CIEA's image special tokens already added.

    Raises:
        ValueError: unknown ``style``.
    """
    if style not in _STYLES:
        raise ValueError(f"style={style!r} is not one of {sorted(_STYLES)}.")
    spec = _STYLES[style]
    specials = [v for k, v in spec.items() if k != "template"]
    tok = Tokenizer(models.WordPiece(unk_token=spec["unk"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    words = spec["template"].split()
    tok.post_processor = processors.TemplateProcessing(
        single=spec["template"],
        special_tokens=[(w, tok.token_to_id(w)) for w in words if w != "$A"],
    )

    tok.decoder = decoders.WordPiece()
    named = {f"{k}_token": v for k, v in spec.items() if k in ("pad", "unk", "cls", "sep", "eos")}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    fast.save_pretrained(str(out_dir))
    return fast
