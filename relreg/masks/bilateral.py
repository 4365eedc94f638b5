"""Edge-aware refinement of a coarse mask with the fast bilateral solver.

Barron & Poole, *The Fast Bilateral Solver*, ECCV 2016, as TokenCut applies it to its upsampled
patch masks (``unsupervised_saliency_detection/bilateral_solver.py`` and ``get_saliency.py`` of
YangtaoWANG95/TokenCut, commit ce70ed6): the mask is the target, the RGB image the guide, the
confidence 0.999 everywhere, ``sigma_spatial`` 16, ``sigma_luma`` 16, ``sigma_chroma`` 8,
``lambda`` 256, 25 conjugate-gradient iterations to a tolerance of 1e-5; the soft output is
thresholded at 0.5, its holes filled and its largest connected component kept.

relreg builds the solver from the paper with SciPy sparse matrices: pixels are splatted onto a
5-D bilateral grid (x, y at ``sigma_spatial``; YUV luma and chroma at ``sigma_luma`` and
``sigma_chroma``), the grid's blur joins each vertex to its 10 neighbours, the blur is
bistochastised (10 iterations), and the sparse system
``(lambda (D_m - D_n B D_n) + diag(S c)) y = S (c t)`` is solved by Jacobi-preconditioned
conjugate gradients and sliced back to the pixels (``x = S^T y``). Where TokenCut multiplies the
refined mask by -1 when its IoU with the coarse mask is below 0.5 (which leaves its saved mask
empty), relreg keeps the coarse mask. (OpenCV's ``fastBilateralSolverFilter`` would be the
library call, but the registry's ``opencv-contrib`` wheels are built without Eigen and raise
"not implemented".)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["BilateralGrid", "bilateral_refine", "mask_iou", "solve"]


def _yuv(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB in [0, 255] -> YUV (BT.601, chroma offset by 128)."""
    r, g, b = (image[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    v = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return np.stack([y, u, v], -1)


class BilateralGrid:
    """The splat matrix ``S`` (vertices x pixels) and blur matrix ``B`` of an image's grid.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        sigma_spatial, sigma_luma, sigma_chroma: the grid's cell sizes.
    """

    def __init__(
        self, image: np.ndarray, sigma_spatial: float, sigma_luma: float, sigma_chroma: float
    ) -> None:
        from scipy import sparse

        h, w, _ = image.shape
        rows, cols = np.mgrid[:h, :w]
        yuv = _yuv(image)
        position = np.stack(
            [
                cols / sigma_spatial,
                rows / sigma_spatial,
                yuv[..., 0] / sigma_luma,
                yuv[..., 1] / sigma_chroma,
                yuv[..., 2] / sigma_chroma,
            ],
            -1,
        ).reshape(-1, 5)
        cells = np.floor(position).astype(np.int64) + 1  # >= 1, so a -1 neighbour stays >= 0
        radix = cells.max(0) + 2
        keys = np.ravel_multi_index(cells.T, radix)
        vertices, pixel_vertex = np.unique(keys, return_inverse=True)
        n, m = h * w, len(vertices)
        self.splat = sparse.csr_matrix((np.ones(n), (pixel_vertex, np.arange(n))), shape=(m, n))
        coords = np.stack(np.unravel_index(vertices, radix), -1)
        blur = sparse.identity(m, format="csr") * (2 * coords.shape[1])
        for d in range(coords.shape[1]):
            for offset in (-1, 1):
                moved = coords.copy()
                moved[:, d] += offset
                valid = (moved[:, d] >= 0) & (moved[:, d] < radix[d])
                key = np.ravel_multi_index(moved[valid].T, radix)
                at = np.searchsorted(vertices, key)
                hit = (at < m) & (vertices[np.minimum(at, m - 1)] == key)
                src = np.nonzero(valid)[0][hit]
                blur = blur + sparse.csr_matrix((np.ones(len(src)), (src, at[hit])), shape=(m, m))
        self.blur = blur.tocsr()


def solve(
    grid: BilateralGrid,
    target: np.ndarray,
    confidence: np.ndarray,
    lam: float,
    num_iter: int,
    tol: float,
    bistochastize: int = 10,
) -> np.ndarray:
    """The bilateral solver's output: ``(N,)`` values for ``(N,)`` targets and confidences."""
    from scipy import sparse
    from scipy.sparse.linalg import cg

    counts = np.asarray(grid.splat.sum(1)).ravel()
    norm = np.ones_like(counts)
    for _ in range(bistochastize):
        norm = np.sqrt(norm * counts / (grid.blur @ norm))
    smooth = sparse.diags(counts) - sparse.diags(norm) @ grid.blur @ sparse.diags(norm)
    weight = grid.splat @ confidence
    system = (lam * smooth + sparse.diags(weight)).tocsr()
    rhs = grid.splat @ (confidence * target)
    preconditioner = sparse.diags(1.0 / np.maximum(system.diagonal(), 1e-5))
    start = rhs / np.maximum(weight, 1e-12)
    y, _ = cg(system, rhs, x0=start, M=preconditioner, maxiter=num_iter, rtol=tol)
    return grid.splat.T @ y


def mask_iou(a: Tensor, b: Tensor) -> float:
    """Intersection over union of two bool masks of one shape (1.0 when both are empty)."""
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def bilateral_refine(
    image: Tensor,
    mask: Tensor,
    *,
    sigma_spatial: float = 16.0,
    sigma_luma: float = 16.0,
    sigma_chroma: float = 8.0,
    lam: float = 256.0,
    num_iter: int = 25,
    tol: float = 1e-5,
    min_iou: float = 0.5,
) -> Tensor:
    """Refine a coarse mask along the image's edges (see the module docstring).

    Args:
        image: ``(3, H, W)`` uint8 RGB, the guide.
        mask: ``(H, W)`` bool, the coarse mask.
        sigma_spatial, sigma_luma, sigma_chroma, lam, num_iter, tol: the solver's parameters
            (TokenCut's values by default).
        min_iou: below this IoU with the coarse mask the refinement is dropped and the coarse mask
            returned.

    Returns:
        ``(H, W)`` bool.
    """
    from scipy import ndimage

    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(
            f"Expected image to be a (3, H, W) uint8 tensor, but got {tuple(image.shape)} "
            f"{image.dtype}."
        )
    if tuple(mask.shape) != tuple(image.shape[1:]):
        raise ValueError(
            f"Expected mask of the image's size {tuple(image.shape[1:])}, but got "
            f"{tuple(mask.shape)}."
        )
    guide = image.permute(1, 2, 0).cpu().numpy()
    target = mask.cpu().numpy().astype(np.float64).ravel()
    grid = BilateralGrid(guide, sigma_spatial, sigma_luma, sigma_chroma)
    soft = solve(grid, target, np.full_like(target, 0.999), lam, num_iter, tol)
    soft = soft.reshape(mask.shape)
    filled = ndimage.binary_fill_holes(soft > 0.5)
    labels, count = ndimage.label(filled)
    if count == 0:
        return mask.clone()
    sizes = np.bincount(labels.ravel())[1:]
    refined = torch.from_numpy(labels == 1 + int(sizes.argmax()))
    return refined if mask_iou(refined, mask.cpu()) >= min_iou else mask.clone()
