"""The mixture-of-shared-LoRA-experts layer (MoSLD, Zhao et al., COLING 2025).

One class covers every method the paper compares; which matrix is shared and whether the shared
matrix gets DropConnect are options (see ``AdapterConfig`` and ``docs/method.md``). The equations
are the functions of ``mosld.adapters.mixture``; this module holds the parameters, their init,
merging, the routing statistics and the balancing loss hooks, and one forward::

    h = W0 x + (alpha / r) * sum_k g_k B_k (A~_k x)

computed in the adapter's compute dtype (``compute_dtype``) and added to the base output.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..quantization import is_quantized_layer
from .mixture import dropconnect, load_balancing_loss, mixture_delta, routing_probs, topk_gates

ADAPTER_PREFIX = "lora_"  # every trainable tensor's name contains this; see is_adapter_parameter


def is_adapter_parameter(name: str) -> bool:
    """True for adapter and router tensors (``...lora_A``, ``...lora_B``, ``...lora_router.weight``)."""
    return ADAPTER_PREFIX in name


# Set while activation checkpointing recomputes a forward in backward (``mosld.adapters.checkpointing``, which
# enters ``recomputing()``); kept here, with the layer that reads it, so that neither module imports the other.
_recompute = threading.local()


def is_recomputing() -> bool:
    """True inside the forward that activation checkpointing recomputes during backward."""
    return getattr(_recompute, "depth", 0) > 0


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Marks the forward run inside it as a recomputation (``is_recomputing()`` is True there)."""
    _recompute.depth = getattr(_recompute, "depth", 0) + 1
    try:
        yield
    finally:
        _recompute.depth -= 1


class RouterStats:
    """Detached running sums of one layer's routing, read by callbacks (never holds a graph)."""

    def __init__(self, num_experts: int, device: torch.device) -> None:
        self.prob_sum = torch.zeros(num_experts, device=device)  # sum over tokens of p
        self.selected = torch.zeros(num_experts, device=device)  # tokens whose top-k holds expert
        self.entropy_sum = torch.zeros((), device=device)
        self.tokens = torch.zeros((), device=device)

    @torch.no_grad()
    def update(self, probs: Tensor, gates: Tensor, token_weight: Tensor | None = None) -> None:
        """Add one forward's (T, N) routing; ``token_weight`` (T,) 1 for real tokens, 0 for padding."""
        probs = probs.detach().float()
        selected = (gates.detach() > 0).float()
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)  # (T,)
        w = probs.new_ones(probs.shape[0]) if token_weight is None else token_weight.float()
        self.prob_sum += w @ probs
        self.selected += w @ selected
        self.entropy_sum += w @ entropy
        self.tokens += w.sum()

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
        base_layer: The frozen projection, kept as ``self.base_layer``.
        r: Rank of each expert.
        alpha: Scaling numerator (output scaled by ``alpha / r``).
        num_experts: Experts of this layer; 1 means plain LoRA (no router).
        top_k: Experts kept per token.
        share: ``"A"``, ``"B"`` or ``None`` (every expert its own A and B).
        shared_dropout: DropConnect probability on the shared matrix (on A when nothing is shared).
        lora_dropout: Dropout on the adapter's input (the router reads the undropped input).
        dtype: Dtype of adapter and router tensors. The adapter math runs in the narrower of this
            and the input's dtype (``compute_dtype``); the output has the base layer's dtype.
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
        self.in_features, self.out_features = base_shape(base_layer)
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
        # (batch, positions) attention mask of the model forward in progress, set by the model-level
        # hooks of ``mosld.adapters.inject._track_padding`` while statistics or the balancing loss are on
        self.token_mask: Tensor | None = None
        # (N,) gates used for every token instead of the router's, when set (mosld.adapters.static)
        self.static_gates: Tensor | None = None
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

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.adapter_delta(x).to(out.dtype)

    def adapter_delta(self, x: Tensor) -> Tensor:
        """``(alpha / r) * sum_k g_k B_k (A~_k x)`` (``mixture_delta``) for every token of ``x`` (..., d_in)."""
        leading_shape = x.shape[:-1]
        x, weight_a, weight_b, router = self._operands(x)
        gates = None if router is None else self.route(x @ router.t(), leading_shape)
        delta = mixture_delta(self.lora_dropout(x), weight_a, weight_b, gates, self.r, self.scaling)
        return delta.view(*leading_shape, self.out_features)

    def route(self, logits: Tensor, leading_shape: torch.Size | None = None) -> Tensor:
        """The gates (T, N) from router logits: the one place the layer routes (``topk_gates``).

        Also records the routing statistics and the balancing loss when they are on
        (``leading_shape``: x's, to leave padding out of both). With ``static_gates`` set, those gates
        for every token instead (no statistics, no balancing loss).
        """
        if self.static_gates is not None:
            self.aux_loss = None
            return self.static_gates.to(logits.dtype).expand_as(logits)
        gates = topk_gates(logits, self.top_k)
        # Activation checkpointing's second forward must run the same ops (it checks the tensors saved
        # for backward) but neither count the statistics again nor replace the balancing loss in use.
        first_pass = not is_recomputing()
        aux = self.compute_aux_loss and self.training
        if first_pass:
            self.aux_loss = None
        if self.collect_router_stats or aux:
            probs = routing_probs(logits)
            token_weight = None if leading_shape is None else self._token_weight(leading_shape)
            if self.collect_router_stats and first_pass:
                if self.router_stats is None:
                    self.router_stats = RouterStats(self.num_experts, logits.device)
                self.router_stats.update(probs, gates, token_weight)
            if aux:
                balance = load_balancing_loss(probs, gates, self.top_k, token_weight)
                if first_pass:
                    self.aux_loss = balance
        return gates

    def compute_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the adapter math: the narrower of the input's and the adapter's.

        fp32 adapters on a bf16 base compute in bf16 (like autocast; the fp32 tensors stay the
        master weights): casting x up instead would keep an fp32 copy of every adapted layer's
        input alive for backward, where the bf16 x is already shared with the base layer.
        """
        adapter_dtype = self.lora_A.dtype
        if input_dtype.is_floating_point and input_dtype.itemsize < adapter_dtype.itemsize:
            return input_dtype
        return adapter_dtype

    def _operands(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """x as (T, d_in), A, B and the router weight, all in the compute dtype (the one place that
        casts), with DropConnect on the shared matrix in training (on the master weights)."""
        dtype = self.compute_dtype(x.dtype)
        weight_a, weight_b = self.lora_A, self.lora_B
        if self.training and self.shared_dropout > 0:
            if self.dropconnect_target == "A":
                weight_a = dropconnect(weight_a, self.shared_dropout)
            else:
                weight_b = dropconnect(weight_b, self.shared_dropout)
        router = None if self.lora_router is None else self.lora_router.weight.to(dtype)
        return x.reshape(-1, self.in_features).to(dtype), weight_a.to(dtype), weight_b.to(dtype), router

    def _token_weight(self, leading_shape: torch.Size) -> Tensor | None:
        """(T,) 1 for real tokens, 0 for padding, from ``token_mask``; None when it does not fit x.

        x is (batch, positions, d_in); the mask covers the cached positions too, so its last
        ``positions`` columns are this forward's tokens.
        """
        mask = self.token_mask
        if mask is None or mask.dim() != 2 or len(leading_shape) != 2:
            return None
        batch, positions = leading_shape
        if mask.shape[0] != batch or mask.shape[1] < positions:
            return None
        return mask[:, mask.shape[1] - positions :].reshape(-1)

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
        if is_quantized_layer(self.base_layer):
            raise RuntimeError(
                f"cannot merge into a quantized base layer ({type(self.base_layer).__name__}): its packed weight "
                "cannot hold the update without requantizing, which would change it; merge on the unquantized "
                "base instead (load it without model.quantization, then load_adapter and merge_adapters), or "
                "export a peft adapter (mosld.export_peft) and serve it on the quantized base"
            )
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
    """transformers' GPT-2 ``Conv1D``, which stores its weight as (in, out)."""
    return isinstance(layer, Conv1D)


def _base_weight(layer: nn.Module) -> Tensor:
    return layer.weight


def base_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if _is_conv1d(layer):
        d_in, d_out = layer.weight.shape
        return d_in, d_out
    raise TypeError(f"can only adapt nn.Linear or transformers Conv1D layers, got {type(layer).__name__}")
