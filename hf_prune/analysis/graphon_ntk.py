"""The Graphon NTK of a fully connected ReLU network, and the spectral quantities the paper reads from it.

Network (NTK parametrisation, no biases by default): f¹ = σ_w/√d₀ · (M¹ ⊙ W¹) x, fˡ⁺¹ = σ_w/√n · (Mˡ⁺¹ ⊙ Wˡ⁺¹)
φ(fˡ), output g = σ_w/√n · (r ⊙ w)·φ(f^L), every W i.i.d. N(0, 1), masks drawn from graphons. At infinite
width a neuron at position u ∈ [0, 1] of layer l has pre-activation covariance Σˡ(u; x, x') and NTK
Θˡ(u; x, x'); a mask with graphon W scales each incoming weight's variance by W(u, v), so with φ = ReLU

    Σ¹(u)   = σ_w² ∫ W¹(u, v) x(v) x'(v) dv + σ_b²                 (v runs over the input coordinates)
    Σˡ⁺¹(u) = σ_w² ∫ Wˡ⁺¹(u, v) E[φ(a)φ(b)] dv + σ_b²,   Σ̇ˡ⁺¹(u) = σ_w² ∫ Wˡ⁺¹(u, v) E[φ'(a)φ'(b)] dv
    Θ¹(u)   = Σ¹(u),   Θˡ⁺¹(u) = σ_w² ∫ Wˡ⁺¹(u, v) Θˡ(v) E[φ'(a)φ'(b)] dv + Σˡ⁺¹(u)

where (a, b) ~ N(0, [[Σˡ(v; x, x), Σˡ(v; x, x')], [·, Σˡ(v; x', x')]]); the readout is one more such step
with the density r(v) (all ones: a dense readout, as the paper leaves output masks out). The integrals
become means over a grid: each graphon is a step function (a K_out × K_in matrix of block densities), the
input coordinates are cut into K_in contiguous groups (in the order the first graphon's columns use).
ReLU's Gaussian expectations are the arc-cosine kernels (Cho & Saul 2009): with ρ = cos θ the correlation,
E[φ(a)φ(b)] = √(Σ_aa Σ_bb)/(2π) · (sin θ + (π − θ) cos θ) and E[φ'(a)φ'(b)] = (π − θ)/(2π).

A constant graphon c on every one of the L masked layers (σ_b = 0) gives exactly c^L times the dense NTK,
since ReLU is positively homogeneous.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .graphon import GraphonError


def _relu_expectations(cov: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[φ(a)φ(b)], E[φ'(a)φ'(b)]) for every pair, from covariances ``cov`` [..., N, N] and the
    variances on its diagonal ``var`` [..., N]."""
    scale = torch.sqrt(var[..., :, None] * var[..., None, :]).clamp_min(1e-300)
    cosine = (cov / scale).clamp(-1.0, 1.0)
    theta = torch.arccos(cosine)
    kernel = scale / (2 * math.pi) * (torch.sin(theta) + (math.pi - theta) * cosine)
    derivative = (math.pi - theta) / (2 * math.pi)
    return kernel, derivative


def _check_graphons(graphons: Sequence[torch.Tensor], inputs: int) -> list[torch.Tensor]:
    if not graphons:
        raise GraphonError("graphons: give one K_out × K_in density matrix per masked layer, got none")
    checked = []
    for i, graphon in enumerate(graphons):
        if not isinstance(graphon, torch.Tensor) or graphon.dim() != 2:
            raise GraphonError(f"graphons[{i}]: must be a 2-D tensor of block densities")
        if bool(((graphon < 0) | (graphon > 1)).any()):
            raise GraphonError(f"graphons[{i}]: densities must lie in [0, 1]")
        if i and graphon.shape[1] != checked[-1].shape[0]:
            raise GraphonError(
                f"graphons[{i}]: has {graphon.shape[1]} input blocks, but graphons[{i - 1}] has "
                f"{checked[-1].shape[0]} output blocks (one layer's outputs are the next one's inputs)"
            )
        checked.append(graphon.to(torch.float64))
    if checked[0].shape[1] > inputs:
        raise GraphonError(
            f"graphons[0]: {checked[0].shape[1]} input blocks for {inputs} input coordinates; use at most {inputs}"
        )
    return checked


def graphon_ntk(
    x: torch.Tensor,
    graphons: Sequence[torch.Tensor],
    *,
    readout: torch.Tensor | None = None,
    sigma_w: float = math.sqrt(2.0),
    sigma_b: float = 0.0,
) -> torch.Tensor:
    """The N×N Gram matrix of the Graphon NTK on the rows of ``x`` [N, d₀] (float64).

    ``graphons[l]`` is layer l+1's mask graphon as a K_out × K_in block-density matrix (the first one's
    columns group the input coordinates in order); ``readout`` the output layer's densities over the last
    layer's K blocks (default: dense)."""
    x = x.to(torch.float64)
    if x.dim() != 2:
        raise GraphonError(f"x: must be [samples, features], got {tuple(x.shape)}")
    layers = _check_graphons(graphons, x.shape[1])
    # Σ¹ per input block k: σ_w² / d₀ · Σ_{i in block k} x_i x'_i, then mixed by the first graphon.
    groups = torch.tensor_split(torch.arange(x.shape[1]), layers[0].shape[1])
    per_block = torch.stack([x[:, g] @ x[:, g].T for g in groups]) / x.shape[1] * layers[0].shape[1]
    sigma = sigma_w**2 * torch.einsum("uk,knm->unm", layers[0], per_block) / layers[0].shape[1] + sigma_b**2
    theta = sigma.clone()
    steps = [
        *layers[1:],
        (
            torch.ones(1, layers[-1].shape[0], dtype=torch.float64)
            if readout is None
            else readout.to(torch.float64).reshape(1, -1)
        ),
    ]
    if steps[-1].shape[1] != layers[-1].shape[0]:
        raise GraphonError(
            f"readout: {steps[-1].shape[1]} densities for {layers[-1].shape[0]} blocks of the last layer"
        )
    for graphon in steps:
        kernel, derivative = _relu_expectations(sigma, torch.diagonal(sigma, dim1=-2, dim2=-1))
        mean = graphon.shape[1]
        new_sigma = sigma_w**2 * torch.einsum("uv,vnm->unm", graphon, kernel) / mean + sigma_b**2
        theta = sigma_w**2 * torch.einsum("uv,vnm->unm", graphon, theta * derivative) / mean + new_sigma
        sigma = new_sigma
    gram = theta[0]
    return (gram + gram.T) / 2  # exact symmetry (the arithmetic already is, up to rounding)


def spectral_summary(gram: torch.Tensor, *, top: int = 5) -> dict[str, float]:
    """The paper's four quantities from a Gram matrix's eigenvalues λ₁ ≥ λ₂ ≥ ...: ``decay_alpha`` (the
    least-squares slope α of log λ_k = −α log k + b over every k with λ_k > 1e-12·λ₁), ``trace_over_top``
    (tr / λ₁, an effective rank), ``top1_over_top2`` (λ₁ / λ₂) and ``top5_share`` (Σ_{k≤5} λ_k / tr)."""
    eigenvalues = torch.linalg.eigvalsh(gram.to(torch.float64)).flip(0).clamp_min(0.0)
    if eigenvalues.numel() < 2 or eigenvalues[0] <= 0:
        raise GraphonError("the Gram matrix needs at least 2 samples and a positive top eigenvalue")
    kept = eigenvalues[eigenvalues > 1e-12 * eigenvalues[0]]
    log_k = torch.log(torch.arange(1, kept.numel() + 1, dtype=torch.float64))
    log_l = torch.log(kept)
    slope = ((log_k - log_k.mean()) * (log_l - log_l.mean())).sum() / ((log_k - log_k.mean()) ** 2).sum()
    trace = eigenvalues.sum()
    return {
        "decay_alpha": float(-slope),
        "trace_over_top": float(trace / eigenvalues[0]),
        "top1_over_top2": float(eigenvalues[0] / eigenvalues[1]) if eigenvalues[1] > 0 else math.inf,
        "top5_share": float(eigenvalues[:top].sum() / trace),
    }
