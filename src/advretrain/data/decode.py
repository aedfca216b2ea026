"""Image bytes → one uint8 N×C×H×W tensor, under an explicit policy for odd images.

Policy (documented in the README):
- mode: every image is converted to RGB (grayscale replicated, palette expanded, alpha dropped); the number of
  converted images is logged as a warning, never hidden.
- size: with `image_size=None` every image must have the size of the first one, otherwise the load fails and names
  the file; with `image_size=S` every image of another size is resized to S×S (bicubic), and the count is logged.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .trees import Tree

log = logging.getLogger(__name__)


def decode_image(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # forces a full decode: a truncated file fails here, not later
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: unreadable image ({exc}); remove or replace this file") from exc
    return image


def decode_all(tree: Tree, names: Sequence[str], image_size: int | None = None) -> torch.Tensor:
    """Decode `names` from `tree` into a uint8 tensor N×3×H×W, applying the module's policy."""
    if not names:
        raise DataError(f"{tree.location}: no images to decode")
    converted = resized = 0
    out: np.ndarray | None = None
    target: tuple[int, int] | None = (image_size, image_size) if image_size else None
    for i, name in enumerate(names):
        image = decode_image(tree.read(name), tree.describe(name))
        if image.mode != "RGB":
            image = image.convert("RGB")
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
            out = np.empty((len(names), target[1], target[0], 3), dtype=np.uint8)
        out[i] = np.asarray(image)
    if converted:
        log.warning("%s: converted %d images to RGB", tree.location, converted)
    if resized:
        log.warning("%s: resized %d images to %dx%d", tree.location, resized, *target)  # type: ignore[misc]
    assert out is not None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # N×H×W×C → N×C×H×W
