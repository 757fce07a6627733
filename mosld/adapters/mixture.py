"""The MoSLD equations as pure functions on tensors (``docs/method.md``, "The layer").

For tokens ``x`` (T, d_in) of a projection with ``N`` experts of rank ``r``::

    p  = softmax(W_router x)                       routing_probs
    g  = top-k of p, renormalised to sum to 1      topk_gates
    A~ = mask * A / (1 - p_drop)                   dropconnect (Eq. 2, training only)
    h  = W0 x + (alpha / r) * sum_k g_k B_k (A~_k x)   mixture_delta is the second term

The experts' A are stacked into one (num_a * r, d_in) matrix and their B into one
(d_out, num_b * r) matrix; ``num_a = 1`` when A is shared (MoSL/MoSLD), ``num_b = 1`` when B is
shared (the share-B ablation), both ``N`` when nothing is shared (MoLA), both 1 for plain LoRA.
Top-k is a mask on the gates, so every expert's tensors are in every step's graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def routing_probs(logits: Tensor) -> Tensor:
    """The per-token routing distribution ``p = softmax(W_router x)``, in at least fp32.

    Args:
        logits: (T, N) router logits ``W_router x``.

    Returns:
        (T, N) probabilities; rows sum to 1.
    """
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def topk_gates(logits: Tensor, top_k: int) -> Tensor:
    """The gates ``g``: the top-k routing probabilities of each token, renormalised to sum to 1.

    ``p_i / sum_{j in topK} p_j = exp(l_i) / sum_{j in topK} exp(l_j)``: the softmax of the kept
    logits, so the full softmax is not needed for the gates.

    Args:
        logits: (T, N) router logits.
        top_k: Experts kept per token (``top_k >= N`` keeps all).

    Returns:
        (T, N) gates in the logits' dtype, exactly ``min(top_k, N)`` non-zeros per row.
    """
    if top_k >= logits.shape[-1]:
        return torch.softmax(logits, dim=-1).to(logits.dtype)
    top_logits, top_idx = logits.topk(top_k, dim=-1)
    kept = torch.softmax(top_logits, dim=-1).to(logits.dtype)
    return torch.zeros_like(logits).scatter(-1, top_idx, kept)


def dropconnect(weight: Tensor, p: float) -> Tensor:
    """Eq. 2: keep each element of the shared matrix with probability ``1 - p``, rescaled by ``1 / (1 - p)``."""
    # F.dropout is DropConnect when applied to a weight; on CUDA it is one fused kernel.
    return nn.functional.dropout(weight, p, training=True)


def mixture_delta(
    x: Tensor, weight_a: Tensor, weight_b: Tensor, gates: Tensor | None, r: int, scaling: float
) -> Tensor:
    """The adapter's output ``(alpha / r) * sum_k g_k B_k (A_k x)`` for every token, all experts at once.

    Two matrix products whatever ``N`` is: ``x A^T`` (the shared A once, or all experts' A
    stacked), then the gate-scaled r-dim codes of all experts times the experts' B stacked. With B
    shared the gate-weighted codes are summed over the experts before the one B.

    Args:
        x: (T, d_in) tokens (after LoRA dropout, if any).
        weight_a: (num_a * r, d_in) stacked A (DropConnect already applied).
        weight_b: (d_out, num_b * r) stacked B (DropConnect already applied).
        gates: (T, N) gates, or None for plain LoRA (one expert, no router).
        r: Rank of each expert.
        scaling: ``alpha / r``.

    Returns:
        (T, d_out) in the dtype of ``x``.
    """
    codes = x @ weight_a.t()  # (T, num_a * r)
    if gates is not None:
        codes = gate_codes(codes, gates.to(codes.dtype), r, weight_b.shape[1] // r)
    return (codes @ weight_b.t()) * scaling


def gate_codes(codes: Tensor, gates: Tensor, r: int, num_b: int) -> Tensor:
    """Scale each expert's code ``A_k x`` by ``g_k``, laid out for the stacked-B product.

    Args:
        codes: (T, r) when A is shared, else (T, N * r).
        gates: (T, N).
        r: Rank of each expert.
        num_b: 1 when B is shared, else N.

    Returns:
        (T, N * r), or (T, r) when B is shared (``sum_k g_k A_k x``, which meets the one B).
    """
    tokens, n = gates.shape
    per_expert = codes.view(tokens, -1, r)  # (T, 1, r) when A is shared, else (T, N, r)
    if num_b == 1:  # B shared (so A is not): one batched product sums the gated codes
        return torch.bmm(gates.unsqueeze(1), per_expert).squeeze(1)
    return (per_expert * gates.unsqueeze(2)).view(tokens, n * r)


def load_balancing_loss(probs: Tensor, gates: Tensor, top_k: int, token_weight: Tensor | None = None) -> Tensor:
    """Switch-style balancing loss ``N * sum_i f_i P_i`` of one routed layer (``docs/method.md``).

    ``f_i`` is the share of the token-to-expert assignments that go to expert i (no gradient),
    ``P_i`` the mean routing probability; 1.0 when the routing is uniform.

    Args:
        probs: (T, N) routing probabilities.
        gates: (T, N) gates (only which are non-zero matters).
        top_k: Experts kept per token (the assignments per token).
        token_weight: (T,) 1 for real tokens, 0 for padding (left out of both means); None: all count.

    Returns:
        A scalar in the dtype of ``probs``.
    """
    weights = token_weights(probs, token_weight)
    assigned = weights @ (gates.detach() > 0).to(probs.dtype)  # sums to top_k
    mean_prob = weights @ probs
    return probs.shape[1] * (assigned / top_k * mean_prob).sum()


def token_weights(probs: Tensor, token_weight: Tensor | None) -> Tensor:
    """(T,) weights summing to 1 over the real tokens (uniform without a padding mask)."""
    if token_weight is None:
        token_weight = probs.new_ones(probs.shape[0])
    token_weight = token_weight.to(probs.dtype)
    return token_weight / token_weight.sum().clamp_min(1)
