"""Turning decoded images of any source into one ``[N, H, W, C] float32`` array in [0, 1].

Every source hands over 8-bit pixels (PIL images or uint8 arrays); resizing is PIL bilinear on the 8-bit
image, and grayscale <-> RGB follows PIL's conversions (RGB -> L uses ITU-R 601-2 luma).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from jaxnas.data.errors import DataError

# PIL modes whose pixels are one intensity; everything else (RGB, RGBA, P, CMYK, ...) is colour.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def _deep_gray_to_8_bit(image: Image.Image) -> Image.Image:
    """An 'L' image from a 16/32-bit integer or float gray image, scaled rather than clipped.

    PIL's own convert('L') clips such pixels at 255, which turns most 16-bit images white.
    """
    pixels = np.asarray(image)
    if image.mode == "F":
        return Image.fromarray(as_uint8_hwc(pixels)[..., 0])
    if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
        if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 65535:
            raise DataError(f"{image.mode} image pixels in [{pixels.min()}, {pixels.max()}] are not 8 or 16-bit")
        pixels = np.round(pixels / 257.0)
    return Image.fromarray(pixels.astype(np.uint8))


def pil_to_uint8(image: Image.Image, size: tuple[int, int] | None = None, channels: int | None = None) -> np.ndarray:
    """One PIL image as ``[H, W, C] uint8``, C = ``channels`` or its own (1 gray, 3 colour).

    Alpha is dropped; 16-bit gray is scaled to 8 bits; ``size`` is (height, width) in pixels, resized
    bilinearly.
    """
    if channels is None:
        channels = 1 if image.mode in _GRAY_MODES else 3
    if image.mode.startswith("I") or image.mode == "F":
        image = _deep_gray_to_8_bit(image)
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def as_uint8_hwc(array: np.ndarray) -> np.ndarray:
    """An image array ``[H, W]`` or ``[H, W, C]`` (C in 1..4) as ``[H, W, C'] uint8``, C' = 1 or 3.

    Integer pixels must lie in 0..255 and float pixels in [0, 1]; alpha channels are dropped.
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise DataError(f"expected an image array [H, W] or [H, W, C] with C in 1..4, got shape {array.shape}")
    array = array[..., :1] if array.shape[-1] == 2 else array[..., :3]
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer) and (array.size == 0 or (array.min() >= 0 and array.max() <= 255)):
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and (array.size == 0 or (array.min() >= 0.0 and array.max() <= 1.0)):
        return np.round(array * 255.0).astype(np.uint8)
    raise DataError(
        f"image pixels of dtype {array.dtype} in [{array.min()}, {array.max()}] are not 8-bit; expected integers "
        "in 0..255 or floats in [0, 1]"
    )


def common_channels(splits: Sequence[Sequence[np.ndarray] | np.ndarray]) -> int:
    """3 if any ``[H, W, C]`` image in any of ``splits`` has colour channels, else 1."""
    return 3 if any(image.shape[-1] >= 3 for images in splits for image in images) else 1


def to_float_nhwc(images: Sequence[np.ndarray] | np.ndarray, size: tuple[int, int], channels: int) -> np.ndarray:
    """``[N, H, W, channels] float32`` in [0, 1] from ``[H, W, C] uint8`` images (C = 1 or 3).

    ``size`` is the output (height, width) in pixels; images of another size are resized bilinearly.
    """
    size = tuple(size)
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (*size, channels):
        return np.divide(images, np.float32(255.0), dtype=np.float32)
    out = np.empty((len(images), *size, channels), np.float32)
    for i, image in enumerate(images):
        if image.shape[:2] == size and image.shape[-1] in (1, channels):
            out[i] = image  # a gray image broadcasts to RGB by repeating its level, as PIL's L -> RGB does
        else:
            out[i] = pil_to_uint8(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image), size, channels)
    out /= np.float32(255.0)  # in place: a large split is hundreds of MB
    return out
