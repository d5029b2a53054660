"""Ridge least squares for the tuning stage (paper Eq. 16-21, Appendix H).

The tuning stage fits continuous mask values ``m`` of a layer's kept units by least squares,
``min_m ||A m - b||^2`` (Eq. 20), from normal equations ``G = A^T A``, ``A^T b`` accumulated
over batches. Eq. 21 assumes ``G`` invertible; it often is not (few tokens, correlated
units), so the project damps towards ``m = 1`` (docs/method.md, "Tuning stage"): with
``delta = m - 1`` it solves

    (G + lambda * s * I) delta = A^T b - G 1,      s = mean(|diag G|)  (1 if that is 0),

so ``lambda = 0`` is the plain least-squares solution and ``lambda -> inf`` gives ``m -> 1``
(the untouched binary mask). Scaling by the diagonal mean makes ``lambda`` unit-free.
Solved in float64 with ``torch.linalg.solve`` (LU); any non-finite result raises
:class:`RidgeSolveError` so the caller can keep the binary mask for that layer.
"""
from __future__ import annotations

import math

import torch


class RidgeSolveError(torch.linalg.LinAlgError):
    """The damped normal equations could not be solved (singular or non-finite)."""


def _check_damping(damping: float) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) \
            or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    return float(damping)


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """Solve ``(G + damping * mean(|diag G|) * I) delta = rhs`` for ``delta``.

    ``gram``: ``(n, n)`` symmetric positive semi-definite; ``rhs``: ``(n,)``. Computed in
    float64, returned in ``gram``'s floating dtype. Raises ``ValueError`` on bad shapes or a
    bad ``damping`` and :class:`RidgeSolveError` (a ``torch.linalg.LinAlgError``) when the
    inputs are not finite, the system is singular, or the solution is not finite.
    """
    damping = _check_damping(damping)
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (n, n) matrix, got shape {tuple(gram.shape)}")
    if rhs.dim() != 1 or rhs.shape[0] != gram.shape[0]:
        raise ValueError(f"rhs must have shape ({gram.shape[0]},), got {tuple(rhs.shape)}")
    out_dtype = gram.dtype if gram.is_floating_point() else torch.float32
    if gram.shape[0] == 0:
        return torch.zeros(0, dtype=out_dtype)
    g = gram.double()
    r = rhs.double()
    if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(r).all())):
        raise RidgeSolveError("ridge_solve: the normal equations contain NaN or inf")
    scale = float(g.diagonal().abs().mean())
    if scale == 0.0:
        scale = 1.0
    system = g + damping * scale * torch.eye(g.shape[0], dtype=torch.float64)
    try:
        delta = torch.linalg.solve(system, r)
    except torch.linalg.LinAlgError as err:
        raise RidgeSolveError(f"ridge_solve: singular system (damping={damping}); raise the "
                              f"damping. {err}") from err
    if not bool(torch.isfinite(delta).all()):
        raise RidgeSolveError(f"ridge_solve: non-finite solution (damping={damping}); raise "
                              "the damping")
    return delta.to(out_dtype)


def solve_towards_one(gram: torch.Tensor, atb: torch.Tensor, damping: float,
                      free: torch.Tensor | None = None) -> torch.Tensor:
    """Mask values ``m`` minimising ``||A m - b||^2 + damping * s * ||m - 1||^2`` (Eq. 20).

    ``gram = A^T A`` ``(n, n)`` and ``atb = A^T b`` ``(n,)`` over all ``n`` units of a layer;
    ``free`` ``(n,)`` bool marks the variables to fit (the kept units); the others are held
    at 0 (masked, Eq. 17's constraint). Returns ``m`` ``(n,)`` in ``gram``'s dtype with
    ``m[~free] = 0`` and ``m[free] = 1 + delta`` from :func:`ridge_solve` on the free block,
    where ``s`` is that block's mean diagonal. Raises like :func:`ridge_solve`.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (n, n) matrix, got shape {tuple(gram.shape)}")
    n = gram.shape[0]
    if free is None:
        free = torch.ones(n, dtype=torch.bool)
    if free.dtype != torch.bool or free.shape != (n,):
        raise ValueError(f"free must be a bool tensor of shape ({n},), got {free.dtype} "
                         f"{tuple(free.shape)}")
    if atb.dim() != 1 or atb.shape[0] != n:
        raise ValueError(f"atb must have shape ({n},), got {tuple(atb.shape)}")
    g = gram.double()[free][:, free]
    # A_F (1 + delta) - b  =  A_F delta - (b - A_F 1)  =>  rhs = A_F^T b - G_FF 1
    rhs = atb.double()[free] - g.sum(1)
    delta = ridge_solve(g, rhs, damping)
    out_dtype = gram.dtype if gram.is_floating_point() else torch.float32
    m = torch.zeros(n, dtype=torch.float64)
    m[free] = 1.0 + delta
    return m.to(out_dtype)
