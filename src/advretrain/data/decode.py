"""Image bytes → one uint8 N×C×H×W tensor, under an explicit policy for odd images.

Policy (documented in the README):
- mode: every image is converted to RGB (grayscale replicated, palette expanded, alpha dropped, 16-bit grayscale
  scaled to 8 bits rather than clipped; floating-point images refused); the number of converted images is logged
  as a warning, never hidden.
- limits: `limits.py` (regular files only, pixels per image, bytes per file and dataset).
- size: with `image_size=None` every image must have the size of the first one, otherwise the load fails and names
  the file; with `image_size=S` every image of another size is resized to S×S (bicubic), and the count is logged.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .limits import check_decoded_bytes, check_pixels
from .trees import Tree

log = logging.getLogger(__name__)


def open_unchecked(data: bytes) -> Image.Image:
    """Image.open without Pillow's own pixel limit, which would refuse with its message before ours is checked."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode_image(data: bytes, where: str) -> Image.Image:
    try:
        image = open_unchecked(data)
        check_pixels(*image.size, where)  # from the header, before any pixel is allocated
        image.load()  # forces a full decode: a truncated file fails here, not later
    except UnidentifiedImageError as exc:  # its message holds only the repr of our in-memory buffer
        raise DataError(
            f"{where}: unreadable image (Pillow cannot identify its format); remove or replace this file"
        ) from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        said = re.sub(r"<[^<>]* object at 0x[0-9a-f]+>", "the file", str(exc))[:160]
        raise DataError(f"{where}: unreadable image (Pillow: {said}); remove or replace this file") from exc
    return image


SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image, where: str) -> Image.Image:
    """RGB, with 16-bit grayscale scaled to 8 bits (65535 → 255) rather than clipped; other 32-bit data refused."""
    if image.mode in SIXTEEN_BIT:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{where}: 32-bit integer pixels outside 0..65535; save it as an 8- or 16-bit image")
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise DataError(f"{where}: floating-point pixels have no agreed range; save it as an 8- or 16-bit image")
    return image.convert("RGB")


def decode_all(tree: Tree, names: Sequence[str], image_size: int | None = None) -> torch.Tensor:
    """Decode `names` from `tree` into a uint8 tensor N×3×H×W, applying the module's policy."""
    if not names:
        raise DataError(f"{tree.location}: no images to decode; add images to the dataset")
    converted = resized = 0
    out: np.ndarray | None = None
    target: tuple[int, int] | None = (image_size, image_size) if image_size else None
    for i, name in enumerate(names):
        image = decode_image(tree.read(name), tree.describe(name))
        if image.mode != "RGB":
            image = to_rgb(image, tree.describe(name))
            converted += 1
        if target is None:
            target = image.size
        if image.size != target:
            if image_size is None:
                raise DataError(
                    f"{tree.describe(name)}: image is {image.size[0]}x{image.size[1]} but the dataset's images are "
                    f"{target[0]}x{target[1]}; pass an image size (--image-size) to resize every image"
                )
            image = image.resize(target, Image.Resampling.BICUBIC)
            resized += 1
        if out is None:
            check_decoded_bytes(len(names), *target, str(tree.location))
            out = np.empty((len(names), target[1], target[0], 3), dtype=np.uint8)
        out[i] = np.asarray(image)
    if converted:
        log.warning("%s: converted %d images to RGB", tree.location, converted)
    if resized:
        log.warning("%s: resized %d images to %dx%d", tree.location, resized, *target)  # type: ignore[misc]
    assert out is not None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # N×H×W×C → N×C×H×W
