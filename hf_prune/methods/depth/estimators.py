"""Estimators of ReplaceMe's linear map T (d×d), applied to the kept layer's MLP output M.

Target residual R = h_{l+n} − (h_l − M): the map must turn M into what the removed layers added.
- ``NormalEquations``: least squares in streaming form. Only MᵀM, MᵀR and ‖R‖² are kept (float64), so
  memory does not grow with the number of calibration tokens, and sums add across batches and ranks.
- ``fit_cosine_map``: Adam from the identity on 1 − cos(M·T, R), or on 1 − cos(M·T + Y, target).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from tqdm.auto import tqdm


class NormalEquations:
    """Streaming accumulation of MᵀM, MᵀR and ‖R‖²; ``solve`` gives T = (MᵀM + αI)⁻¹ MᵀR."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.cross = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.target_sq = torch.zeros((), dtype=torch.float64, device=device)
        self.num_tokens = 0

    def add(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add rows of ``inputs`` (M, [N, d]) and ``targets`` (R, [N, d])."""
        m = inputs.to(self.gram.device, torch.float64)
        r = targets.to(self.gram.device, torch.float64)
        self.gram += m.T @ m
        self.cross += m.T @ r
        self.target_sq += (r * r).sum()
        self.num_tokens += m.shape[0]

    def all_reduce(self) -> None:
        """Sum statistics over data-parallel ranks (no-op without an initialised process group)."""
        if dist.is_available() and dist.is_initialized():
            for tensor in (self.gram, self.cross, self.target_sq):
                dist.all_reduce(tensor)
            count = torch.tensor([self.num_tokens], dtype=torch.float64, device=self.gram.device)
            dist.all_reduce(count)
            self.num_tokens = int(count.item())

    def solve(self, ridge: float = 0.0) -> tuple[torch.Tensor, float]:
        """T and the ridge α actually used (raised from ``ridge`` when MᵀM is singular)."""
        dim = self.gram.shape[0]
        eye = torch.eye(dim, dtype=torch.float64, device=self.gram.device)
        scale = float(self.gram.diagonal().mean().clamp_min(1e-30))
        alpha = ridge
        for _ in range(12):
            chol, info = torch.linalg.cholesky_ex(self.gram + alpha * eye)
            # Rounding can let an exactly singular MᵀM factor "successfully" with a near-zero pivot;
            # cond(MᵀM) ≈ (max/min pivot)², so treat a condition number past 1e13 as singular too.
            pivots = chol.diagonal()
            if int(info) == 0 and float((pivots.min() / pivots.max()) ** 2) > 1e-13:
                return torch.cholesky_solve(self.cross, chol), alpha
            alpha = max(alpha * 10.0, scale * 1e-10)
        raise RuntimeError("least-squares normal equations stayed singular after ridge fallback")

    def squared_error(self, transform: torch.Tensor) -> float:
        """‖M·T − R‖² from the accumulated sums (no activations needed)."""
        t = transform.to(self.gram)
        return float((t * (self.gram @ t)).sum() - 2.0 * (t * self.cross).sum() + self.target_sq)


def fit_cosine_map(
    inputs: torch.Tensor,
    residual: torch.Tensor,
    base: torch.Tensor | None = None,
    *,
    lr: float,
    epochs: int,
    batch_tokens: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """T minimising 1 − cos(M·T, R) (``base`` None), or 1 − cos(M·T + Y, R + Y) with ``base`` = Y."""
    dim = inputs.shape[1]
    transform = torch.nn.Parameter(torch.eye(dim, device=device, dtype=torch.float32))
    optimizer = torch.optim.Adam([transform], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    num = inputs.shape[0]
    steps = epochs * ((num + batch_tokens - 1) // batch_tokens)
    with tqdm(total=steps, desc="cosine map", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            for idx in torch.randperm(num, generator=generator).split(batch_tokens):
                m = inputs[idx].to(device, torch.float32)
                target = residual[idx].to(device, torch.float32)
                prediction = m @ transform
                if base is not None:
                    y = base[idx].to(device, torch.float32)
                    prediction, target = prediction + y, target + y
                loss = 1.0 - torch.nn.functional.cosine_similarity(prediction, target, dim=-1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
    return transform.detach().to(torch.float64)
