"""A fused autograd op for the mixture (``MoSLDLinear.fused``), measured against the plain path.

``(alpha / r) * sum_k g_k B_k (A~_k x)`` (``mosld.adapters.mixture``) plus the base product as one
autograd node with a hand-written backward: DropConnect, one GEMM for the stacked A and the router
logits, top-k gates, gate-scaled codes, one GEMM for all experts' B onto which the base GEMM
accumulates. Tested against ``mixture.py`` for values and gradients.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from .mixture import topk_gates

if TYPE_CHECKING:
    from .layer import MoSLDLinear


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
                gates = topk_gates(logits, plan.top_k)
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


def fused_applies(layer: MoSLDLinear) -> bool:
    """The op covers the training hot path only: no statistics, no balancing loss, no input dropout
    on a routed layer (whose A reads dropout(x) while the router reads x)."""
    if layer.collect_router_stats or (layer.compute_aux_loss and layer.training):
        return False
    return not (layer.lora_router is not None and layer.input_dropout_active())


def fused_forward(layer: MoSLDLinear, x: Tensor) -> Tensor:
    """``base(x) + adapter(x)`` through ``_FusedMixture``."""
    layer.aux_loss = None
    plan = _plan(layer, x)
    router = layer.lora_router.weight if layer.lora_router is not None else None
    base = layer.base_layer
    if layer.input_dropout_active():  # plain LoRA only: the adapter reads dropout(x)
        return _FusedMixture.apply(layer.lora_dropout(x), base(x), None, None, layer.lora_A, router, layer.lora_B, plan)
    if can_fuse_base(base):
        return _FusedMixture.apply(x, None, base.weight, base.bias, layer.lora_A, router, layer.lora_B, plan)
    return _FusedMixture.apply(x, base(x), None, None, layer.lora_A, router, layer.lora_B, plan)


def can_fuse_base(base: nn.Module) -> bool:
    """Do the base product inside the op: a plain frozen ``nn.Linear`` without hooks (not FSDP's flat view)."""
    return (
        type(base) is nn.Linear
        and base.weight.dim() == 2
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and not (base._forward_hooks or base._forward_pre_hooks)
    )


def _plan(layer: MoSLDLinear, x: Tensor) -> _Plan:
    device_type = x.device.type
    autocast = device_type if torch.is_autocast_enabled(device_type) else None
    return _Plan(
        r=layer.r,
        num_a=layer.num_a,
        num_b=layer.num_b,
        num_experts=layer.num_experts,
        top_k=layer.top_k,
        scaling=layer.scaling,
        dropconnect=layer.shared_dropout if layer.training else 0.0,
        drop_b=layer.dropconnect_target == "B",
        dtype=torch.get_autocast_dtype(device_type) if autocast else layer.compute_dtype(x.dtype),
        autocast=autocast,
    )
