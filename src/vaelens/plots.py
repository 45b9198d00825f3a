"""Figures from arrays (matplotlib, Agg). Nothing here imports model or training code."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(images: np.ndarray, image_shape: Sequence[int], ncol: Optional[int] = None, pad: int = 1) -> np.ndarray:
    """Tile flattened images (n, h*w) into one 2-D array with `pad` pixels between them."""
    n = len(images)
    h, w = image_shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    for i, img in enumerate(np.asarray(images).reshape(n, h, w)):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid


def save_image_grid(path, images: np.ndarray, image_shape: Sequence[int], ncol: Optional[int] = None,
                    scale: int = 4) -> None:
    """Write a PNG of tiled images, values clipped to [0, 1], each pixel `scale` x `scale`."""
    grid = np.clip(image_grid(images, image_shape, ncol), 0, 1)
    grid = np.kron(grid, np.ones((scale, scale), dtype=np.float32))
    plt.imsave(path, grid, cmap="gray", vmin=0, vmax=1)
