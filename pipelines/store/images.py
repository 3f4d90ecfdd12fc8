"""The one rule for an image's bytes, wherever an image comes in: a corpus record at ingest,
a picture a user searches with (``ciea search --image``, the page's upload).

:func:`normalise_image`: at most ``max_bytes`` encoded; the header's width × height at most
``max_pixels`` *before* any pixel is decoded (the decompression-bomb guard); recognised and
fully decoded by Pillow; EXIF orientation applied and converted to RGB (alpha composited on
white). The original bytes are kept when they already are an upright RGB JPEG or PNG,
otherwise re-encoded (JPEG stays JPEG at quality 95, everything else becomes PNG), so a
document and a query built from the same picture hold the same bytes.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

#: Defaults of the byte and pixel caps (ingest's ``limits.max_image_bytes`` / ``max_image_pixels``).
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
_KEEP_FORMATS = ("JPEG", "PNG")


class ImageRejected(ValueError):
    """Bytes that are not an image this project takes: ``reason`` is a stable code
    (``image_too_large``, ``image_unrecognised``, ``image_decode_failed``), ``detail`` says
    what and how to fix."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def normalise_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                    *, limit_names: tuple[str, str] = ("max_image_bytes", "max_image_pixels")
                    ) -> tuple[bytes, int, int]:
    """Decoded, upright, RGB image bytes and their size (module docstring).

    Args:
        data: the encoded image.
        max_bytes / max_pixels: the caps.
        limit_names: how the caller's settings name the caps (for the fix in a message).

    Returns:
        ``(bytes, width, height)``.

    Raises:
        ImageRejected: ``image_too_large``, ``image_unrecognised`` or ``image_decode_failed``.
    """
    bytes_key, pixels_key = limit_names
    if len(data) > max_bytes:
        raise ImageRejected("image_too_large", f"encoded image is {len(data)} bytes; the limit is {max_bytes} "
                            f"({bytes_key})")
    with warnings.catch_warnings():
        # Pillow's own bomb check is a warning below 2x its limit; ours is explicit below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            # Pillow's own guard fires first above twice its MAX_IMAGE_PIXELS.
            raise ImageRejected("image_too_large", f"decompression-bomb guard: {e} ({pixels_key}={max_pixels})") from None
        except Exception as e:  # Pillow raises many types for garbage input
            raise ImageRejected("image_unrecognised", f"not a decodable image ({type(e).__name__}: {e}); check the "
                                "file is an image and not truncated") from None
        width, height = img.size
        if width * height > max_pixels:
            raise ImageRejected("image_too_large", f"header says {width}x{height} = {width * height} pixels; the "
                                f"limit is {max_pixels} ({pixels_key}, the decompression-bomb guard)")
        fmt = img.format
        try:
            img.load()
        except Exception as e:
            raise ImageRejected("image_decode_failed", f"{fmt or 'image'} data does not decode ({type(e).__name__}: "
                                f"{e}); the file is truncated or corrupt") from None
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block is not worth rejecting the pixels for
            orientation = 1
        stored_mode = img.mode
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            img = _to_rgb(img)
        width, height = img.size
        if orientation == 1 and fmt in _KEEP_FORMATS and stored_mode == "RGB":
            return data, width, height
        out = io.BytesIO()
        if fmt == "JPEG":
            img.save(out, format="JPEG", quality=95)
        else:
            img.save(out, format="PNG")
        return out.getvalue(), width, height


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")
