"""Per-unit saliency for the Pruner: summed per batch by the fused kernel, averaged per prune step,
then an EMA across steps."""
from __future__ import annotations

import torch

from nvit_kernels.saliency import SaliencyPlan, TensorMap, saliency_accumulate


class NoSaliencyError(RuntimeError):
    """A prune step was asked for before any saliency was accumulated (no accumulate() since the
    pruner was made, and no EMA from an earlier step). Nothing was changed: accumulate the saliency of
    at least one batch and call prune_step() again (a training loop may simply postpone the step;
    ``Pruner.has_saliency`` says beforehand whether a step can rank)."""


class SaliencyScores:
    """The saliency I_S of every unit: (Σ w·g)² over each structure's writing slices, summed over the
    batches since the last prune step (one fused kernel call per batch), then averaged and folded into
    an EMA (momentum `ema_momentum`) when a step asks for the ranking scores.

    pairs: (parameter, segment map) per parameter some saliency reads (nvit.spec.saliency_maps);
    criterion: "hessian" (w·g) or "magnitude" (w·w: the baseline, no gradient needed)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, TensorMap]], num_units: int, *, criterion: str,
                 ema_momentum: float, deterministic: bool):
        self.params = [p for p, _ in pairs]
        self.device = self.params[0].device
        self.plan = SaliencyPlan.build([t for _, t in pairs], num_units, device=self.device)
        self.scores = torch.zeros(num_units, dtype=torch.float32, device=self.device)
        self.n_batches = 0
        self.ema: torch.Tensor | None = None
        self.criterion, self.ema_momentum, self.deterministic = criterion, ema_momentum, deterministic

    def accumulate(self) -> None:
        """Add this mini-batch's (Σ g·w)² of every structure into the score buffer (after backward)."""
        if self.criterion == "magnitude":  # baseline: (Σ w²)² per unit, no gradient needed
            w = [p.detach() for p in self.params]
            saliency_accumulate(w, w, self.plan, self.scores, deterministic=self.deterministic)
            self.n_batches += 1
            return
        grads = []
        for i, p in enumerate(self.params):
            if p.grad is None:
                raise RuntimeError(f"nvit: parameter #{i} (shape {tuple(p.shape)}) has no gradient; "
                                   "call accumulate() after loss.backward()")
            grads.append(p.grad)
        saliency_accumulate([p.detach() for p in self.params], grads, self.plan, self.scores,
                            deterministic=self.deterministic)
        self.n_batches += 1

    @property
    def has_saliency(self) -> bool:
        """Whether a prune step can rank now: a batch was accumulated since the last step, or an earlier
        step left an EMA."""
        return self.n_batches > 0 or self.ema is not None

    def step_scores(self) -> torch.Tensor:
        """Saliency per unit used for ranking: batch average since the last step, EMA across steps.
        Raises NoSaliencyError (a RuntimeError) when there is none yet (see has_saliency)."""
        if self.n_batches == 0:
            if self.ema is None:
                raise NoSaliencyError("nvit: no saliency accumulated yet; call accumulate() after backward first")
            return self.ema
        avg = (self.scores / self.n_batches).double().cpu()
        m = self.ema_momentum
        self.ema = avg if self.ema is None else m * self.ema + (1 - m) * avg
        self.scores.zero_()
        self.n_batches = 0
        return self.ema
