"""The CIEA encoder and its baselines: one shared space, cosine similarity.

An encoding API, not a training API: ``encode_query``, ``encode_documents`` and
``encode_image_only`` return L2-normalised (batch, dim) tensors. Losses live in
:mod:`ciea_model.losses`; the training step in :mod:`ciea_model.training`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CIEAConfig
from .extractor import ComplementaryInformationExtractor
from .processor import DocumentBatch
from .towers import ClipTextTower, ClipVisionTower, ProjectedTextTower, TextTower, VisionTower


class CIEAModel(nn.Module):
    """Text tower + (optional) CLIP vision tower + projector + (optional) extractor.

    The variant in ``config`` decides which parts exist and are used (CIEA_METHOD.md,
    "Baselines"): ``text-only`` has no vision tower; ``marvel`` and ``ciea-no-cie`` feed the
    projected patches straight into the LM; ``univl-dr`` is UniVL-DR's CLIP dual encoder
    (a :class:`ClipTextTower` and a :class:`ClipVisionTower`, no LM, projector or
    extractor): an image document is its CLIP image vector plus its caption's CLIP text
    vector. Where no pretrained CLIP text encoder exists (the demo) the text side is a
    :class:`ProjectedTextTower`, an LM plus a linear map into the image projection's space.
    """

    def __init__(
        self, config: CIEAConfig, text: TextTower | ClipTextTower, vision: VisionTower | None
    ) -> None:
        super().__init__()
        if config.uses_images and vision is None:
            raise ValueError(f"variant {config.variant!r} needs a vision tower")
        if config.is_dual_encoder:
            _check_dual_towers(text, vision)
        self.config = config
        self.text = text
        self.vision = vision if config.uses_images else None
        width = text.hidden_size
        self.projector = nn.Linear(vision.hidden_size, width) if config.uses_projector else None
        self.extractor = (
            ComplementaryInformationExtractor(width, config.extractor)
            if config.uses_extractor else None
        )
        # CLIP-style learnable temperature: score = exp(θ)·cos, clamped, no weight decay.
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    @property
    def dim(self) -> int:
        return self.text.hidden_size

    @property
    def patch_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the vision tower's patch grid, row-major as ``w`` is laid out
        (``None`` for variants that read no pixels)."""
        if self.vision is None:
            return None
        side = self.vision.image_size // self.vision.model.config.patch_size
        return side, side

    def scale(self) -> torch.Tensor:
        """exp(θ) clamped at ``logit_scale_max`` (a scalar tensor with gradient).

        The clamp acts on θ (at ln max): in float32 exp(ln 100) is 100.0000076, so a clamp
        on exp(θ) would give θ zero gradient from the default init on."""
        return self.logit_scale.clamp(max=math.log(self.config.logit_scale_max)).exp()

    # ---- text -------------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Queries and text documents: (B, L) → (B, D), unit norm."""
        return F.normalize(self.text(attention_mask, input_ids=input_ids), dim=-1)

    encode_query = encode_text

    # ---- images -----------------------------------------------------------------------
    def project_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, N, D) projected patches ``P``, float32 even under autocast.

        The extractor's ``w`` compares these patches with caption embeddings; patches
        rounded to bfloat16 by an autocast vision tower or projector moved ``w`` by ~1e-3
        although :func:`complementary_weights` itself is float32 (issue 27). The frozen
        ViT-B/32 over 49 patches is a small part of a step, so fp32 here costs little."""
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            return self.projector(self.vision(pixel_values.float())).float()

    def encode_patch_sequence(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, patch_mask: torch.Tensor,
        patches: torch.Tensor,
    ) -> torch.Tensor:
        """Token ids with ``<im_patch>`` placeholders (``patch_mask``) filled with the
        (B, N, D) ``patches`` rows, through the LM → (B, D), unit norm."""
        # Token embeddings with the <im_patch> placeholders overwritten by the patch rows.
        embeds = self.text.embed_tokens(input_ids)  # (B, L, D)
        embeds = embeds.masked_scatter(patch_mask.unsqueeze(-1), patches.to(embeds.dtype))
        return F.normalize(self.text(attention_mask, inputs_embeds=embeds), dim=-1)

    def _image_inputs(
        self, image: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (patches for the document, patches for the image-only encoding, the
        extractor's (B, N) weights ``w`` or ``None`` without an extractor)."""
        patches = self.project_patches(image["pixel_values"])  # (B, N, D)
        if self.extractor is None:
            return patches, patches, None
        caption_embeds = self.text.embed_tokens(image["input_ids"])  # (B, L, D)
        refined, w = self.extractor(patches, caption_embeds, image["caption_mask"], return_weights=True)
        return refined, refined if self.config.image_only_extractor else patches, w

    def encode_image_documents(
        self, image: dict[str, torch.Tensor], return_image_only: bool = False, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Image + caption documents → (B, D); with ``return_image_only`` also the
        image-only encodings (B, D) from the same vision forward pass; with
        ``return_weights`` also (last) the extractor's complementary weights ``w`` (B, N),
        exactly those the document vector was computed with (``None`` for variants
        without the extractor). ``w`` depends on the document only, never on a query,
        so it can be stored next to the vector and shown later without the model."""
        weights = None
        if self.config.is_dual_encoder:
            # UniVL-DR's release (OpenMatch/UniVL-DR, UniVL-DR/gen_embeddings.py,
            # gen_embeddings(): `embeddings = model.encode_image(...)`, `embeddings =
            # embeddings + cap_embeddings`, then `F.normalize`; train.py sums the same
            # way): the raw CLIP image and caption vectors are added, then normalised.
            img = self.vision.embed(image["pixel_values"])  # (B, D)
            doc = F.normalize(img + self.text(image["attention_mask"], input_ids=image["input_ids"]), dim=-1)
            io = F.normalize(img, dim=-1)
        else:
            doc_patches, io_patches, weights = self._image_inputs(image)
            doc = self.encode_patch_sequence(
                image["input_ids"], image["attention_mask"], image["patch_mask"], doc_patches
            )
            io = self.encode_patches_alone(image, io_patches) if return_image_only else None
        out = (doc, io) if return_image_only else (doc,)
        if return_weights:
            out = (*out, weights)
        return out if len(out) > 1 else doc

    def encode_patches_alone(self, image: dict[str, torch.Tensor], patches: torch.Tensor) -> torch.Tensor:
        """An image without its caption: (B, N, D) patch rows through the LM → (B, D), unit
        norm; between ``<im_start>`` and ``<im_end>`` (``image``'s ``io_*`` sequences) or,
        with ``config.image_only_frame`` off, as the LM's whole input (MARVEL's
        ``encode_images_only``: no frame, no prefix, every position attended)."""
        if self.config.image_only_frame:
            return self.encode_patch_sequence(
                image["io_input_ids"], image["io_attention_mask"], image["io_patch_mask"], patches)
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device)
        return F.normalize(self.text(mask, inputs_embeds=patches), dim=-1)

    def encode_image_only(self, image: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[<im_start>] + P̂ + [<im_end>]`` through the LM → (B, D), unit norm (the
        dual encoder: CLIP's image vector). The extractor still needs the caption to
        weigh the patches, so ``image`` is the collated image sub-batch of
        :meth:`CIEAProcessor.collate_documents`."""
        return self.encode_image_documents(image, return_image_only=True)[1]

    # ---- mixed documents ----------------------------------------------------------------
    def encode_documents(
        self, batch: DocumentBatch, return_image_only: bool = False, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Mixed text/image documents → (B, D) in the batch's order.

        With ``return_image_only`` also returns the image-only encodings of the image
        sub-batch, (B_img, D) in ``batch.image_index`` order (``None`` if no images).
        With ``return_weights`` also (last) the extractor's weights ``w`` of the image
        sub-batch, (B_img, N) in ``batch.image_index`` order (``None`` if no images or
        no extractor).
        """
        out: torch.Tensor | None = None
        image_only = weights = None
        if batch.text is not None:
            t = self.encode_text(batch.text["input_ids"], batch.text["attention_mask"])
            out = t.new_zeros((batch.size, t.shape[-1]))
            out = out.index_copy(0, batch.text_index, t)
        if batch.image is not None:
            res = self.encode_image_documents(
                batch.image, return_image_only=return_image_only, return_weights=True
            )
            d, weights = res[0], res[-1]
            image_only = res[1] if return_image_only else None
            if out is None:
                out = d.new_zeros((batch.size, d.shape[-1]))
            out = out.index_copy(0, batch.image_index, d)
        extras = ((image_only,) if return_image_only else ()) + ((weights,) if return_weights else ())
        return (out, *extras) if extras else out


def _check_dual_towers(text: nn.Module, vision: nn.Module | None) -> None:
    """The dual encoder sums CLIP image and text vectors: both towers must be projected
    encoders (CLIP's, or an LM with a projection), projecting into one space."""
    if not isinstance(text, (ClipTextTower, ProjectedTextTower)) or not isinstance(vision, ClipVisionTower):
        raise ValueError(
            "variant 'univl-dr' needs a ClipTextTower (or a ProjectedTextTower) and a ClipVisionTower: "
            "build it with create_model_and_processor"
        )
    if text.hidden_size != vision.projection_dim:
        raise ValueError(
            f"variant 'univl-dr': CLIP text projection_dim={text.hidden_size} differs from the "
            f"vision projection_dim={vision.projection_dim}: give both towers one projection_dim"
        )
