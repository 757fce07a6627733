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

The training hot path is one ``torch.autograd.Function`` (``_FusedMixture``) with a hand-written
backward: about ten kernels per adapted layer in each direction, one autograd node instead of
~15, no host-device synchronisation, and only small tensors saved besides the layer input (which
q/k/v, or gate/up, share). The shared A (or the stacked As) and the router read x in one GEMM;
the gates are the softmax of the top-k logits (the full softmax is computed only when routing
statistics or the balancing loss ask for it). For a frozen ``nn.Linear`` base the op also takes
over the base product, so that the adapter's output (forward) and its input gradient (backward)
are accumulated by GEMMs in place rather than added in separate passes over (tokens x features)
tensors. It works under ``torch.compile`` (no graph breaks) and autocast. The plain autograd
path (``_gated_codes``) remains for routing statistics, the balancing loss and input dropout
on a routed layer. See ``docs/benchmarks.md`` for what this buys.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

ADAPTER_PREFIX = "lora_"  # every trainable tensor's name contains this; see is_adapter_parameter


def is_adapter_parameter(name: str) -> bool:
    """True for adapter and router tensors (``...lora_A``, ``...lora_B``, ``...lora_router.weight``)."""
    return ADAPTER_PREFIX in name


def dropconnect(weight: Tensor, p: float) -> Tensor:
    """Eq. 2: keep each element with probability ``1 - p`` and rescale by ``1 / (1 - p)``."""
    # F.dropout is DropConnect when applied to a weight; on CUDA it is one fused kernel.
    return nn.functional.dropout(weight, p, training=True)


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


class _Plan(NamedTuple):
    """The static facts ``_FusedMixture`` needs besides tensors (constants for ``torch.compile``)."""

    r: int
    num_a: int  # 1 when A is shared (or plain LoRA), else num_experts
    num_b: int  # 1 when B is shared (or plain LoRA), else num_experts
    num_experts: int  # 1 means plain LoRA: no router
    top_k: int
    scaling: float
    dropconnect: float  # probability; 0.0 outside training
    drop_b: bool  # DropConnect on B (share-B ablation) rather than on A
    dtype: torch.dtype  # adapter compute dtype
    autocast: str | None  # device type whose autocast was on at forward (its dtype is ``dtype``)


class _FusedMixture(torch.autograd.Function):
    """``W0 x + (alpha / r) * sum_k g_k B_k (A~_k x)`` as one autograd node.

    Forward: DropConnect, one GEMM for the shared/stacked A and the router logits together,
    top-k gates, gate-scaled codes, one GEMM for all experts' B, onto whose output the base GEMM
    accumulates. Backward mirrors it; the gate gradient uses the softmax backward on the full
    (T, N) gate matrix, whose zeros outside the top-k give exactly the top-k softmax's
    gradient, so no gather/scatter is needed.

    Inputs: ``x`` (..., d_in); either ``base_out`` (..., d_out, the base layer's output) or
    ``base_weight``/``base_bias`` of a frozen ``nn.Linear`` whose product is done here;
    ``weight_a`` (num_a*r, d_in); ``router`` (N, d_in) or None; ``weight_b`` (d_out, num_b*r).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        base_out: Tensor | None,
        base_weight: Tensor | None,
        base_bias: Tensor | None,
        weight_a: Tensor,
        router: Tensor | None,
        weight_b: Tensor,
        plan: _Plan,
    ) -> Tensor:
        # Python-side dtype checks instead of no-op ``.to`` calls: on a launch-bound GPU step the
        # host's per-op cost is what an adapter layer adds, so every dispatcher call counts.
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        dtype = plan.dtype
        with _no_autocast(plan.autocast):
            out = None
            if base_weight is not None:
                # autocast would run the base product in its dtype; it is off in here, so cast
                w0 = _cast(base_weight, dtype) if plan.autocast else base_weight
                xb = _cast(x2, w0.dtype)
                if base_bias is not None or w0.dtype != dtype:
                    out = nn.functional.linear(xb, w0, None if base_bias is None else _cast(base_bias, w0.dtype))
            else:
                out = base_out if base_out.dim() == 2 else base_out.reshape(-1, base_out.shape[-1])
            xa = _cast(x2, dtype)

            mask = None
            if plan.dropconnect > 0:
                if plan.drop_b:
                    weight_b, mask = torch.native_dropout(weight_b, plan.dropconnect, True)
                else:
                    weight_a, mask = torch.native_dropout(weight_a, plan.dropconnect, True)
            w_in = weight_a if router is None else _cat_as([weight_a, router], dtype)
            w_in, w_out = _cast(w_in, dtype), _cast(weight_b, dtype)
            h = nn.functional.linear(xa, w_in)  # (T, num_a*r + N): codes and logits from one read of x
            if router is None:
                gates, u = None, h
            else:
                codes, logits = h.split([plan.num_a * plan.r, plan.num_experts], dim=1)
                gates = _topk_gates(logits, plan.top_k)
                u = _gate(codes, gates, plan)
            if out is None:
                # adapter product first, then the (compute-bound) base GEMM accumulates onto it:
                # reading the adapter's output costs nothing there, unlike a separate add pass.
                # beta=0: the first argument (any finite tensor broadcasting to the output) is ignored.
                out = torch.addmm(w_out[:, 0], u, w_out.t(), beta=0, alpha=plan.scaling)
                out.addmm_(xb, w0.t())
            elif out.dtype != dtype:
                out = out + (torch.mm(u, w_out.t()) * plan.scaling).to(out.dtype)
            elif base_weight is not None:
                out.addmm_(u, w_out.t(), alpha=plan.scaling)  # ``out`` is ours (a biased base): in place
            else:
                out = torch.addmm(out, u, w_out.t(), alpha=plan.scaling)
        ctx.plan = plan
        ctx.fused_base = base_weight is not None
        ctx.x_meta = (x.dtype, x.shape)
        ctx.param_dtypes = (weight_a.dtype, weight_b.dtype)
        ctx.save_for_backward(xa, base_weight, w_in, w_out, h, gates, u, mask)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        plan: _Plan = ctx.plan
        xa, base_weight, w_in, w_out, h, gates, u, mask = ctx.saved_tensors
        dtype = plan.dtype
        ka = plan.num_a * plan.r
        need = ctx.needs_input_grad
        need_weights = need[4] or need[5] or need[6]
        d_wa = d_router = d_wb = dx = None
        with _no_autocast(plan.autocast):
            grad2 = grad if grad.dim() == 2 else grad.reshape(-1, grad.shape[-1])
            gd = _cast(grad2, dtype)
            # beta=0: the first argument only gives the shape; alpha applies the scaling
            du = torch.addmm(u, gd, w_out, beta=0, alpha=plan.scaling)  # (T, num_b*r)
            if need_weights:
                d_wb = torch.addmm(w_out, gd.t(), u, beta=0, alpha=plan.scaling)  # (d_out, num_b*r)
            if gates is None:
                dh = du
            else:
                d_codes, d_gates = _ungate(du, h.narrow(1, 0, ka), gates, plan)
                # the softmax backward on the full gate matrix: zero outside the top-k
                d_logits = torch._softmax_backward_data(d_gates, gates, -1, gates.dtype)
                dh = torch.cat([d_codes, d_logits], dim=1)
            if need[0]:
                x_dtype, x_shape = ctx.x_meta
                if ctx.fused_base:
                    w0 = _cast(base_weight, dtype) if plan.autocast else base_weight
                    if w0.dtype == dtype:
                        # the base's input gradient accumulates onto the adapter's: no separate add
                        dx = torch.mm(dh, w_in)
                        dx.addmm_(grad2, w0)
                    else:
                        dx = torch.mm(grad2, w0)
                        dx += torch.mm(dh, w_in).to(dx.dtype)
                else:
                    dx = torch.mm(dh, w_in)
                dx = _cast(dx, x_dtype)
                if dx.dim() != len(x_shape):
                    dx = dx.view(x_shape)
            if need_weights:
                d_win = torch.mm(dh.t(), xa)  # (num_a*r + N, d_in)
        if need_weights:
            dtype_a, dtype_b = ctx.param_dtypes
            d_win = _cast(d_win, dtype_a)  # A and the router share a dtype: one cast, then views
            d_wa = d_win if gates is None else d_win[:ka]
            d_router = None if gates is None else d_win[ka:]
            d_wb = _cast(d_wb, dtype_b)
            if mask is not None:
                scale = 1.0 / (1.0 - plan.dropconnect)
                if plan.drop_b:
                    d_wb = torch.ops.aten.native_dropout_backward(d_wb, mask, scale)
                else:
                    d_wa = torch.ops.aten.native_dropout_backward(d_wa, mask, scale)
        d_out = grad if need[1] else None
        return dx, d_out, None, None, d_wa, d_router, d_wb, None


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _cat_as(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``torch.cat(tensors).to(dtype)`` as one kernel in eager mode (cat casts into its ``out``)."""
    if tensors[0].dtype == dtype or torch.compiler.is_compiling():  # inductor fuses the cast itself
        return torch.cat(tensors)
    rows = sum(t.shape[0] for t in tensors)
    return torch.cat(tensors, out=tensors[0].new_empty(rows, *tensors[0].shape[1:], dtype=dtype))


def _no_autocast(device_type: str | None) -> Any:
    """Switch autocast off inside the fused op, which casts explicitly (backward then needs no autocast state)."""
    if device_type is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _topk_gates(logits: Tensor, top_k: int) -> Tensor:
    """(T, N) renormalised top-k gates: the softmax of the top-k logits scattered into zeros.

    ``p_i / sum_{j in topK} p_j = exp(l_i) / sum_{j in topK} exp(l_j)``, so the full softmax
    (only needed for statistics and the balancing loss) stays off the hot path. Softmax
    accumulates in fp32 internally for bf16/fp16 inputs.
    """
    if top_k == logits.shape[-1]:
        return torch.softmax(logits, dim=-1)
    top_logits, top_idx = logits.topk(top_k, dim=-1)
    return torch.zeros_like(logits).scatter_(-1, top_idx, torch.softmax(top_logits, dim=-1))


def _gate(codes: Tensor, gates: Tensor, plan: _Plan) -> Tensor:
    """Gate-scaled codes laid out for the stacked-B product: (T, N*r), or (T, r) when B is shared."""
    tokens, n, r = codes.shape[0], plan.num_experts, plan.r
    if plan.num_b == 1:  # experts' codes meet the same B: sum_k g_k c_k, one batched product
        return torch.bmm(gates.unsqueeze(1), codes.reshape(tokens, n, r)).squeeze(1)
    codes3 = codes.unsqueeze(1) if plan.num_a == 1 else codes.reshape(tokens, n, r)
    return (codes3 * gates.unsqueeze(2)).view(tokens, n * r)


def _ungate(du: Tensor, codes: Tensor, gates: Tensor, plan: _Plan) -> tuple[Tensor, Tensor]:
    """Backward of ``_gate``: gradients of the codes (T, num_a*r) and of the gates (T, N)."""
    tokens, n, r = du.shape[0], plan.num_experts, plan.r
    if plan.num_b == 1:  # u = sum_k g_k c_k
        codes3 = codes.reshape(tokens, n, r)
        d_gates = torch.bmm(codes3, du.unsqueeze(2)).squeeze(2)
        d_codes = (gates.unsqueeze(2) * du.unsqueeze(1)).view(tokens, n * r)
        return d_codes, d_gates
    du3 = du.view(tokens, n, r)
    if plan.num_a == 1:  # u_k = g_k c: batched products over the experts
        d_gates = torch.bmm(du3, codes.unsqueeze(2)).squeeze(2)
        d_codes = torch.bmm(gates.unsqueeze(1), du3).squeeze(1)
        return d_codes, d_gates
    codes3 = codes.reshape(tokens, n, r)
    d_gates = (du3 * codes3).sum(-1)
    d_codes = (du3 * gates.unsqueeze(2)).view(tokens, n * r)
    return d_codes, d_gates


class MoSLDLinear(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus a routed mixture of LoRA experts.

    Args:
        base_layer: The frozen projection, kept as ``self.base_layer``. A plain frozen ``nn.Linear``
            without hooks has its product (same weight, same ``F.linear``) computed inside the
            fused op; anything else (Conv1D, hooked, trainable or quantized layers) is called.
        r: Rank of each expert.
        alpha: Scaling numerator (output scaled by ``alpha / r``).
        num_experts: Experts of this layer; 1 means plain LoRA (no router).
        top_k: Experts kept per token.
        share: ``"A"``, ``"B"`` or ``None`` (every expert its own A and B).
        shared_dropout: DropConnect probability on the shared matrix (on A when nothing is shared).
        lora_dropout: Dropout on the adapter's input.
        dtype: Dtype of adapter and router tensors. The adapter math runs in the narrower of this
            and the input's dtype (``compute_dtype``), or in autocast's dtype when autocast is on;
            the output has the base layer's dtype.
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
        # (batch, positions) attention mask of the model forward in progress, set by the model-level
        # hooks of ``mosld.adapters.inject._track_padding`` while statistics or the balancing loss are on
        self.token_mask: Tensor | None = None
        # (N,) gates used for every token instead of the router's, when set (mosld.adapters.static)
        self.static_gates: Tensor | None = None
        self._plans: dict[tuple, _Plan] = {}  # see _plan
        # Fixed at construction; plain attributes because nn.Module's __getattr__ (submodules,
        # parameters) costs about a microsecond per lookup on the per-call path.
        self._routed = self.lora_router is not None
        self._input_dropout = lora_dropout > 0
        self._base_is_linear = type(base_layer) is nn.Linear
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
            per row summing to 1, in the logits' dtype.
        """
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        return probs, self.gates(logits)

    def gates(self, logits: Tensor) -> Tensor:
        """Renormalised top-k gates (T, N) from router logits, without the full softmax; with
        ``static_gates`` set, those gates for every token instead."""
        if self.static_gates is not None:
            return self.static_gates.to(logits.dtype).expand_as(logits)
        return _topk_gates(logits, self.top_k)

    def load_balancing_loss(self, probs: Tensor, gates: Tensor, token_weight: Tensor | None = None) -> Tensor:
        """Switch-style: ``N * sum_i f_i P_i``; f_i = share of the token-to-expert assignments
        that go to expert i (no gradient), P_i = mean routing probability. 1.0 when uniform.
        ``token_weight`` (T,) leaves padding tokens (weight 0) out of both means."""
        selected = (gates > 0).float()
        if token_weight is None:
            token_weight = probs.new_ones(probs.shape[0])
        w = token_weight.to(probs.dtype) / token_weight.sum().clamp_min(1)  # (T,) sums to 1 over real tokens
        assigned, mean_prob = w.to(selected.dtype) @ selected, w @ probs
        return self.num_experts * (assigned.detach() / self.top_k * mean_prob).sum()  # assigned / k sums to 1

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        if not self._fused_path():
            out = self.base_layer(x)
            codes, weight_b = self._gated_codes(x)
            flat = out.reshape(-1, self.out_features)
            if flat.dtype == codes.dtype:
                flat = torch.addmm(flat, codes, weight_b.t(), alpha=self.scaling)
            else:
                flat = flat + (codes @ weight_b.t() * self.scaling).to(flat.dtype)
            return flat.view(out.shape)
        if self.aux_loss is not None:  # no balancing loss on this path; drop the last one
            self.aux_loss = None
        plan = self._plan(x)
        router = self.lora_router.weight if self._routed else None
        base = self.base_layer
        if self._input_dropout_active():  # plain LoRA only: the adapter reads dropout(x), the base x
            return _FusedMixture.apply(
                self.lora_dropout(x), base(x), None, None, self.lora_A, router, self.lora_B, plan
            )
        if self._can_fuse_base(base):
            return _FusedMixture.apply(x, None, base.weight, base.bias, self.lora_A, router, self.lora_B, plan)
        return _FusedMixture.apply(x, base(x), None, None, self.lora_A, router, self.lora_B, plan)

    def adapter_delta(self, x: Tensor) -> Tensor:
        """``(alpha / r) * sum_k g_k B_k (A~_k x)`` for every token of ``x`` (..., d_in).

        Computed by the same code as the training forward (the fused op, or the autograd path
        when statistics, the balancing loss or input dropout on a routed layer need it).
        """
        if not self._fused_path():
            codes, weight_b = self._gated_codes(x)
            delta = (codes @ weight_b.t()) * self.scaling  # (T, d_out)
            return delta.view(*x.shape[:-1], self.out_features)
        plan = self._plan(x)
        zeros = x.new_zeros(*x.shape[:-1], self.out_features, dtype=plan.dtype)
        router = self.lora_router.weight if self._routed else None
        x_in = self.lora_dropout(x) if self._input_dropout_active() else x
        return _FusedMixture.apply(x_in, zeros, None, None, self.lora_A, router, self.lora_B, plan)

    def _input_dropout_active(self) -> bool:
        return self.training and self._input_dropout

    def _fused_path(self) -> bool:
        """The fused op covers the training hot path; the autograd path serves what needs more.

        The full softmax (statistics, balancing loss) and a routed layer whose A reads dropout(x)
        while the router reads x take the autograd path, and so do fixed gates (``static_gates``).
        """
        if self.static_gates is not None or self.collect_router_stats or (self.compute_aux_loss and self.training):
            return False
        return not (self._routed and self._input_dropout_active())

    def _can_fuse_base(self, base: nn.Module) -> bool:
        """Do the base product inside the fused op: a plain frozen ``nn.Linear`` without hooks.

        Not when a wrapper (FSDP) replaced the base: its weight is a sharded flat view until the
        wrapper's own forward gathers it.
        """
        return (
            self._base_is_linear
            and isinstance(base, nn.Linear)
            and base.weight.dim() == 2
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and not (base._forward_hooks or base._forward_pre_hooks)
        )

    def _plan(self, x: Tensor) -> _Plan:
        """The fused op's constants for this call, cached per input dtype / autocast / training state.

        Building the tuple costs more host time than several kernel launches; the key holds every
        attribute a caller may change between steps (dropout, top-k, scaling, adapter dtype).
        """
        device_type = x.device.type
        autocast = device_type if torch.is_autocast_enabled(device_type) else None
        dropconnect = self.shared_dropout if self.training else 0.0
        key = (x.dtype, autocast, dropconnect, self.top_k, self.scaling, self.lora_A.dtype)
        compiling = torch.compiler.is_compiling()  # a traced dict cache would only add guards
        plan = None if compiling else self._plans.get(key)
        if plan is None:
            plan = _Plan(
                r=self.r,
                num_a=self.num_a,
                num_b=self.num_b,
                num_experts=self.num_experts,
                top_k=self.top_k,
                scaling=self.scaling,
                dropconnect=dropconnect,
                drop_b=self.dropconnect_target == "B",
                dtype=torch.get_autocast_dtype(device_type) if autocast else self.compute_dtype(x.dtype),
                autocast=autocast,
            )
            if not compiling:
                self._plans[key] = plan
        return plan

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

    def _gated_codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The gate-scaled codes of all experts (T, num_b*r) and B, both in the compute dtype."""
        leading_shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features)  # (T, d_in)
        dtype = self.compute_dtype(x.dtype)
        x = x.to(dtype)
        weight_a, weight_b = self.lora_A, self.lora_B
        if self.training and self.shared_dropout > 0:
            if self.dropconnect_target == "A":
                weight_a = dropconnect(weight_a, self.shared_dropout)
            else:
                weight_b = dropconnect(weight_b, self.shared_dropout)
        weight_b = weight_b.to(dtype)

        if self.lora_router is None:
            return self.lora_dropout(x) @ weight_a.to(dtype).t(), weight_b  # (T, r)
        if isinstance(self.lora_dropout, nn.Identity):
            # A and the router read the same x: one product for both.
            both = x @ torch.cat([weight_a, self.lora_router.weight]).to(dtype).t()  # (T, num_a*r + N)
            codes, logits = both.split([weight_a.shape[0], self.num_experts], dim=-1)
        else:
            codes = self.lora_dropout(x) @ weight_a.to(dtype).t()  # (T, num_a*r)
            logits = x @ self.lora_router.weight.to(dtype).t()  # (T, N)
        gates = self.gates(logits).to(codes.dtype)  # under autocast softmax returns fp32
        if self.collect_router_stats or (self.compute_aux_loss and self.training):
            probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            token_weight = self._token_weight(leading_shape)
            if self.collect_router_stats:
                if self.router_stats is None:
                    self.router_stats = RouterStats(self.num_experts, x.device)
                self.router_stats.update(probs, gates, token_weight)
            self.aux_loss = (
                self.load_balancing_loss(probs, gates, token_weight)
                if self.compute_aux_loss and self.training
                else None
            )
        else:
            self.aux_loss = None
        return self._gate_codes(codes, gates), weight_b

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
        return gated.view(tokens, self.num_experts * self.r)

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
