"""Batched encoding of query and document lists into numpy arrays (no gradient)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .model import CIEAModel
from .processor import CIEAProcessor, Document


@torch.inference_mode()
def encode_queries(
    model: CIEAModel, processor: CIEAProcessor, texts: Sequence[str], batch_size: int = 128,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Queries → (N, D) float32 unit vectors."""
    model.eval()
    out = [
        model.encode_query(**{k: v.to(device) for k, v in processor.tokenize(texts[i : i + batch_size]).items()})
        .float().cpu().numpy()
        for i in range(0, len(texts), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.dim), dtype=np.float32)


@torch.inference_mode()
def encode_documents(
    model: CIEAModel, processor: CIEAProcessor, docs: Sequence[Document], batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Mixed documents → (N, D) float32 unit vectors, in input order."""
    model.eval()
    out = [
        model.encode_documents(processor.collate_documents(docs[i : i + batch_size]).to(device))
        .float().cpu().numpy()
        for i in range(0, len(docs), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.dim), dtype=np.float32)
