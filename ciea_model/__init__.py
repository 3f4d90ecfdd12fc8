"""ciea_model: the CIEA retriever as a library (torch + transformers only).

Build with :func:`create_model_and_processor`, encode with ``encode_query`` /
``encode_documents`` / ``encode_image_only``, save and load with :func:`save_checkpoint` /
:func:`load_checkpoint`. Nothing here imports Ray, LanceDB or Delta Lake.
"""

from __future__ import annotations

from .checkpoint import load_checkpoint, model_id, save_checkpoint
from .config import (
    VARIANTS,
    CIEAConfig,
    ConfigError,
    ExtractorConfig,
    TextTowerConfig,
    VisionTowerConfig,
)
from .extractor import ComplementaryInformationExtractor, complementary_weights
from .factory import create_model_and_processor
from .losses import contrastive_loss, gather_with_grad
from .model import CIEAModel
from .processor import CIEAProcessor, Document, DocumentBatch, TrainBatch, TrainExample

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "CIEAConfig",
    "CIEAModel",
    "CIEAProcessor",
    "ComplementaryInformationExtractor",
    "ConfigError",
    "Document",
    "DocumentBatch",
    "ExtractorConfig",
    "TextTowerConfig",
    "TrainBatch",
    "TrainExample",
    "VisionTowerConfig",
    "complementary_weights",
    "contrastive_loss",
    "create_model_and_processor",
    "gather_with_grad",
    "load_checkpoint",
    "model_id",
    "save_checkpoint",
]
