"""Cross-entropy of scored tokens, computing logits only at the scored positions.

Shared by ablation, Taylor and CMA-ES: the model's decoder stack runs once, then the unembedding is applied
to the few positions that predict scored tokens (never [tokens x vocab] for the whole sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .arch import adapter


def final_hidden(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Last hidden state after the final norm, [B, T, d] (the model's own, norm applied once)."""
    ad = adapter(model)
    out = ad.base(
        input_ids=input_ids.to(ad.device),
        attention_mask=None if attention_mask is None else attention_mask.to(ad.device),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def token_ce(
    model: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Per-token CE (nats, fp32) [B, P] of `targets` [P] predicted at `positions` [P] from normed hidden [B, T, d].
    The positions are chunked so that at most [B, chunk, vocab] logits exist at once."""
    ad = adapter(model)
    positions = positions.to(hidden.device)
    targets = targets.to(hidden.device)
    out = []
    for i in range(0, positions.numel(), chunk):
        p, t = positions[i : i + chunk], targets[i : i + chunk]
        logits = ad.logits_from_normed(hidden[:, p]).float()
        out.append(
            F.cross_entropy(logits.flatten(0, 1), t.repeat(hidden.shape[0]), reduction="none").view(hidden.shape[0], -1)
        )
    return torch.cat(out, dim=1)


def scored_ce(
    model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Per-token CE [B, P] of one sample's scored tokens for each batch row (rows may carry different head
    interventions; all rows hold the same token ids)."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    return token_ce(model, final_hidden(model, input_ids), positions, targets, chunk)
