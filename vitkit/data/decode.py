"""Decode any image file to the 8-bit RGB picture a model expects, or fail loudly.

Files in the wild come in many modes. Each is mapped to RGB so that what you see is what the
model sees:

    L, 1, P (no transparency)  -> replicated / looked-up colours
    RGBA, LA, PA, P + tRNS     -> composited over a white background: rgb = a·fg + (1 - a)·white
    CMYK                       -> through the embedded ICC profile when there is one, else PIL's formula
    I;16, I (16-bit PNG/TIFF)  -> scaled, v8 = round(v16 / 257), never clipped at 255
    F (float TIFF)             -> [0, 1] scaled to [0, 255], anything else clipped
    EXIF orientation           -> applied, so a phone picture stands upright

A file is fully decoded (not just opened): a truncated or corrupt file raises
:class:`DecodeError` naming the path, which the datasets catch, count and skip.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps

WHITE = (255, 255, 255)


class DecodeError(OSError):
    """An image file that cannot be decoded (truncated, corrupt, not an image, unsupported mode)."""


def load_rgb(path: str | os.PathLike[str], background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Open, fully decode, EXIF-rotate and convert ``path`` to an 8-bit RGB :class:`PIL.Image.Image`.

    Args:
        path: an image file in any format Pillow reads.
        background: the colour transparent pixels are composited on.

    Raises:
        DecodeError: the file is missing, truncated, corrupt, not an image or in a mode without an RGB
            meaning. The message names the path.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone (a library, a notebook) asked Pillow to pad truncated files with grey. We want to
        # know about them instead; the flag is global, so it is reported rather than silently reset.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True, so truncated files would decode as grey "
            f"padding; set it to False to load {path}."
        )
    try:
        with Image.open(path) as image:
            image.load()  # decode every pixel now: a truncated file fails here, not later
            source_format = image.format
            return to_rgb(_exif_upright(image), background, source_format)
    except DecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise DecodeError(f"Cannot decode image {path}: {error}") from error


def _exif_upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag. A broken EXIF block is metadata, not pixels: it is ignored."""
    if image.format == "JPEG" and "exif" not in image.info:
        return image  # a JPEG keeps EXIF only in its APP1 segment: nothing to parse (the common case)
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # Pillow raises many types on malformed EXIF
        return image


def to_rgb(
    image: Image.Image, background: tuple[int, int, int] = WHITE, source_format: str | None = None
) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB (see the module docstring for the rules).

    ``source_format`` (e.g. ``"PNG"``; default ``image.format``) tells how to read mode ``I``.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        has_alpha = "transparency" in image.info or (
            image.palette is not None and image.palette.mode == "RGBA"
        )
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_high_depth_to_uint8(image, source_format or image.format)).convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, YCbCr, LAB, HSV, RGBX...
    except ValueError as error:
        raise DecodeError(f"Images of mode {mode!r} cannot be converted to RGB: {error}") from error


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """CMYK -> RGB, through the file's ICC profile when it has one (what a viewer would show)."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(
                image, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to the plain formula below
    return image.convert("RGB")


def _high_depth_to_uint8(image: Image.Image, source_format: str | None) -> np.ndarray:
    """A 16-bit or 32-bit integer / float single-channel image -> uint8 array, scaled, not clipped.

    16-bit data (``I;16*`` modes, and mode ``I`` from PNG, which is how Pillow opens 16-bit PNGs)
    maps 0..65535 to 0..255. Mode ``I`` from other formats keeps 0..255 when it fits, is treated as
    16-bit when it fits in 16 bits, and is min-max scaled otherwise. Mode ``F`` is taken as [0, 1].
    """
    array = np.asarray(image)
    mode = image.mode
    if mode == "F":
        array = array.astype(np.float64)
        if np.nanmax(array, initial=0.0) <= 1.0:
            array = array * 255.0
        return np.clip(np.nan_to_num(array), 0, 255).round().astype(np.uint8)
    array = array.astype(np.int64)
    if mode.startswith("I;16") or source_format == "PNG":
        scale = 65535
    else:
        low, high = int(array.min(initial=0)), int(array.max(initial=0))
        if low >= 0 and high <= 255:
            return array.astype(np.uint8)
        if low >= 0 and high <= 65535:
            scale = 65535
        else:
            array = array - low
            scale = max(high - low, 1)
    return np.clip((array * 255 + scale // 2) // scale, 0, 255).astype(np.uint8)
