"""The mixture-of-shared-LoRA-experts layer (MoSLD, Zhao et al., COLING 2025).

One class covers every method the paper compares; which matrix is shared and whether the
shared matrix gets DropConnect are options (see ``AdapterConfig``). For a frozen projection
``W0`` with ``N`` experts the layer computes (PAPER.md, "The layer")::

    p = softmax(W_router x)                      # per token, N probabilities
    g = renormalised top-k of p                  # exactly k non-zeros summing to 1
    h = W0 x + (alpha / r) * sum_k g_k B_k (A~_k x)

with ``A_k = A`` for all k when A is shared (MoSL/MoSLD), ``B_k = B`` when B is shared (the
Table 2 ablation), and ``A~ = mask * A / (1 - p)`` (Eq. 2, DropConnect on the shared matrix,
training only).

All experts are computed with two matrix products, not a loop: ``x @ A^T`` (the shared A once,
or all experts' A stacked), then the gate-scaled r-dim codes of all experts ``(T, N*r)`` times
the experts' B stacked into ``(N*r, d_out)``. Top-k is a mask on the gates, so every expert's
tensors take part in the graph each step and DDP needs no ``find_unused_parameters``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ADAPTER_PREFIX = "lora_"  # every trainable tensor's name contains this; see is_adapter_parameter


def is_adapter_parameter(name: str) -> bool:
    """True for adapter and router tensors (``...lora_A``, ``...lora_B``, ``...lora_router.weight``)."""
    return ADAPTER_PREFIX in name


def dropconnect(weight: Tensor, p: float) -> Tensor:
    """Eq. 2: keep each element with probability ``1 - p`` and rescale by ``1 / (1 - p)``."""
    keep = torch.empty_like(weight).bernoulli_(1.0 - p)
    return weight * keep / (1.0 - p)


class RouterStats:
    """Detached running sums of one layer's routing, read by callbacks (never holds a graph)."""

    def __init__(self, num_experts: int, device: torch.device) -> None:
        self.prob_sum = torch.zeros(num_experts, device=device)  # sum over tokens of p
        self.selected = torch.zeros(num_experts, device=device)  # tokens whose top-k holds expert
        self.entropy_sum = torch.zeros((), device=device)
        self.tokens = torch.zeros((), device=device)

    @torch.no_grad()
    def update(self, probs: Tensor, gates: Tensor) -> None:
        probs = probs.detach().float()
        self.prob_sum += probs.sum(0)
        self.selected += (gates.detach() > 0).sum(0).float()
        self.entropy_sum -= (probs * probs.clamp_min(1e-12).log()).sum()
        self.tokens += probs.shape[0]

    def summary(self) -> dict[str, Tensor]:
        """Mean routing probabilities, fraction of tokens selecting each expert, mean entropy."""
        n = self.tokens.clamp_min(1.0)
        return {
            "mean_prob": self.prob_sum / n,
            "load": self.selected / n,
            "entropy": self.entropy_sum / n,
            "tokens": self.tokens.clone(),
        }


class MoSLDLinear(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus a routed mixture of LoRA experts.

    Args:
        base_layer: The frozen projection; kept as ``self.base_layer`` and called unchanged.
        r: Rank of each expert.
        alpha: Scaling numerator (output scaled by ``alpha / r``).
        num_experts: Experts of this layer; 1 means plain LoRA (no router).
        top_k: Experts kept per token.
        share: ``"A"``, ``"B"`` or ``None`` (every expert its own A and B).
        shared_dropout: DropConnect probability on the shared matrix (on A when nothing is shared).
        lora_dropout: Dropout on the adapter's input.
        dtype: Dtype of adapter and router tensors; inputs are cast to it and outputs back.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        num_experts: int,
        top_k: int,
        share: str | None,
        shared_dropout: float = 0.0,
        lora_dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = _base_shape(base_layer)
        self.r, self.num_experts = r, num_experts
        self.top_k = min(top_k, num_experts)
        self.scaling = alpha / r
        self.share = share
        self.shared_dropout = shared_dropout
        self.dropconnect_target = "B" if share == "B" else "A"
        # With one expert there is nothing to share: it is LoRA, one A and one B.
        num_a = 1 if share == "A" or num_experts == 1 else num_experts
        num_b = 1 if share == "B" or num_experts == 1 else num_experts
        device = _base_weight(base_layer).device
        self.lora_A = nn.Parameter(torch.empty(num_a * r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, num_b * r, device=device, dtype=dtype))
        self.lora_router = (
            nn.Linear(self.in_features, num_experts, bias=False, device=device, dtype=dtype)
            if num_experts > 1
            else None
        )
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.collect_router_stats = False
        self.router_stats: RouterStats | None = None
        self.aux_loss: Tensor | None = None  # set by forward when compute_aux_loss is on
        self.compute_aux_loss = False
        self.reset_adapter_parameters()

    @property
    def num_a(self) -> int:
        return self.lora_A.shape[0] // self.r

    @property
    def num_b(self) -> int:
        return self.lora_B.shape[1] // self.r

    def reset_adapter_parameters(self) -> None:
        """Kaiming-uniform A and router (as ``nn.Linear``), zero B: the output equals the base's."""
        if self.lora_A.is_meta:
            return
        # kaiming on the stacked (num_a * r, d_in) matrix uses fan_in = d_in, the same bound
        # as initialising each expert's A on its own.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.lora_router is not None:
            nn.init.kaiming_uniform_(self.lora_router.weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, experts={self.num_experts}, "
            f"top_k={self.top_k}, share={self.share}, shared_dropout={self.shared_dropout}"
        )

    # ------------------------------------------------------------------ routing
    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token softmax, keep the top-k, renormalise.

        Args:
            logits: (T, N) router logits.

        Returns:
            probs: (T, N) full softmax in at least fp32; gates: (T, N) with exactly k non-zeros
            per row summing to 1.
        """
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        if self.top_k == self.num_experts:
            return probs, probs
        top_vals, top_idx = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_idx, top_vals / top_vals.sum(-1, keepdim=True))
        return probs, gates

    def load_balancing_loss(self, probs: Tensor, gates: Tensor) -> Tensor:
        """Switch-style: ``N * sum_i f_i P_i``; f_i = share of the token-to-expert assignments
        that go to expert i (no gradient), P_i = mean routing probability. 1.0 when uniform."""
        assigned = (gates > 0).float().mean(0) / self.top_k  # (N,) sums to 1
        return self.num_experts * (assigned.detach() * probs.mean(0)).sum()

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.adapter_delta(x).to(out.dtype)

    def adapter_delta(self, x: Tensor) -> Tensor:
        """``(alpha / r) * sum_k g_k B_k (A~_k x)`` for every token of ``x`` (..., d_in)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(self.lora_A.dtype)  # (T, d_in)
        weight_a, weight_b = self.lora_A, self.lora_B
        if self.training and self.shared_dropout > 0:
            if self.dropconnect_target == "A":
                weight_a = dropconnect(weight_a, self.shared_dropout)
            else:
                weight_b = dropconnect(weight_b, self.shared_dropout)

        if self.lora_router is None:
            codes = self.lora_dropout(x) @ weight_a.t()  # (T, r)
        else:
            if isinstance(self.lora_dropout, nn.Identity):
                # A and the router read the same x: one product for both.
                both = x @ torch.cat([weight_a, self.lora_router.weight]).t()  # (T, num_a*r + N)
                codes, logits = both.split([weight_a.shape[0], self.num_experts], dim=-1)
            else:
                codes = self.lora_dropout(x) @ weight_a.t()  # (T, num_a*r)
                logits = self.lora_router(x)  # (T, N)
            probs, gates = self.route(logits)
            codes = self._gate_codes(codes, gates.to(codes.dtype))
            if self.collect_router_stats:
                if self.router_stats is None:
                    self.router_stats = RouterStats(self.num_experts, x.device)
                self.router_stats.update(probs, gates)
            self.aux_loss = self.load_balancing_loss(probs, gates) if self.compute_aux_loss and self.training else None
        delta = (codes * self.scaling) @ weight_b.t()  # (T, d_out)
        return delta.view(*lead, self.out_features)

    def _gate_codes(self, codes: Tensor, gates: Tensor) -> Tensor:
        """Scale each expert's r-dim code by its gate, laid out for the stacked-B product.

        codes: (T, r) when A is shared, else (T, N*r). Returns (T, N*r), or (T, r) when B is
        shared (the experts' codes are then summed, since they meet the same B).
        """
        tokens = codes.shape[0]
        if self.num_a == 1:
            gated = codes.unsqueeze(1) * gates.unsqueeze(2)  # (T, N, r)
        else:
            gated = codes.view(tokens, self.num_experts, self.r) * gates.unsqueeze(2)
        if self.num_b == 1:
            return gated.sum(1)  # (T, r)
        return gated.reshape(tokens, self.num_experts * self.r)

    # ------------------------------------------------------------------ merging
    def delta_weight(self) -> Tensor:
        """``scaling * B A`` in the base weight's layout (only defined for one expert)."""
        if self.lora_router is not None:
            raise RuntimeError(
                f"cannot merge a routed mixture of {self.num_experts} experts into the base weight: the gates "
                "depend on each token's input, so no single weight matrix is equivalent; only one-expert "
                "(method 'lora') adapters can be merged"
            )
        delta = self.scaling * (self.lora_B @ self.lora_A)  # (d_out, d_in)
        return delta.t() if _is_conv1d(self.base_layer) else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter into the base weight; the original is kept so ``unmerge`` is exact."""
        if self.merged:
            return
        weight = _base_weight(self.base_layer)
        delta = self.delta_weight()
        self._unmerged_weight = weight.detach().clone()
        weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before ``merge``."""
        if not self.merged:
            return
        _base_weight(self.base_layer).copy_(self._unmerged_weight)
        del self._unmerged_weight
        self.merged = False


def _is_conv1d(layer: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D stores its weight as (in, out); avoid importing it here.
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def _base_weight(layer: nn.Module) -> Tensor:
    return layer.weight


def _base_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if _is_conv1d(layer):
        d_in, d_out = layer.weight.shape
        return d_in, d_out
    raise TypeError(f"can only adapt nn.Linear or transformers Conv1D layers, got {type(layer).__name__}")
