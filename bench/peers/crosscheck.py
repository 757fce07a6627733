"""Correctness cross-check: MoE-PEFT's MoLA and LoRA weights copied into mosld (and peft), same logits?

MoE-PEFT's MoLA and mosld's ``mola`` agree on the router (a bias-free linear map of the layer
input), the top-k and its renormalisation (softmax over all experts, keep the top 2, divide by
their sum = mosld's softmax over the kept logits), and the scaling (alpha / r). So with the same
base weights, MoE-PEFT's experts and routers copied into mosld, and dropout off on both sides,
both must compute the same logits and the same gradients up to float rounding. The balancing
losses differ by definition; both are computed on the same routing and each is re-derived from
the other side's router logits, which shows that the listed differences are the only ones.
Steps, run in the two workers of ``bench.peers.compare``:

1. MoE-PEFT (its environment): its floor, LoRA and MoLA on the shared base; every LoRA B drawn at
   random (its init is zero, which would hide the adapters). With dropout off: logits, router
   logits, its balancing loss, and the adapters' gradients of the language-model loss. Its fused
   LoRA (``LoraFunction``, what its training runs) cannot switch dropout off, so it runs at a
   dropout of 1e-9 (no element is dropped). Plus three probes of behaviour that differs from
   mosld: two forwards the way its evaluator runs them (is dropout on?), its fused LoRA backward
   against autograd on the same dropout mask, and a MoLA training step after an inference-mode
   forward.
2. mosld (the project's environment): the floor, mosld ``lora``, peft LoRA and mosld ``mola`` with
   those weights; the same outputs and gradients.
3. Here: the differences, written to ``bench/results/cpu-peers-crosscheck.json``.

    python -m bench.peers.crosscheck                       # SmolLM2-135M, 2 x 64 tokens (~1-2 min)
    python -m bench.peers.crosscheck --shape tiny          # random tiny Llama (under a minute)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.peers.common import EXPERTS, LORA_DROPOUT, TOP_K, R

# The absolute tolerance on logits, in units of the floors' own difference: the two sides compute
# the same frozen Llama in different code (transformers vs MoE-PEFT's modeling_llama), so their
# floors may already differ by float reassociation; an adapter computed alike may add rounding of
# the same order, not more. Both sides run in fp32.
TOLERANCE_FACTOR = 4.0
TOLERANCE_FLOOR = 1e-4  # when the floors agree bit for bit
# Gradients: the largest difference over all adapter tensors, relative to the largest gradient
# entry. fp32 sums of a few thousand products round at about 1e-7 relative each; 1e-4 leaves room
# for the floors' reassociation but not for a different definition (the probes below differ by 1e-1).
GRAD_RTOL = 1e-4
# Dropout that drops nothing: MoE-PEFT's fused LoRA asserts a dropout > 0 and always applies it.
NO_DROP = 1e-9
# (mosld-side variant, MoE-PEFT variant) of the logits and gradient comparisons
PAIRS = (("lora", "lora"), ("lora", "lora_fused"), ("peft_lora", "lora"), ("mola", "mola"))


# ---------------------------------------------------------------------------- MoE-PEFT side
def _peer_linears(llm) -> list:
    """Every MoE-PEFT ``Linear`` of the model, in layer order, q/k/v/o then gate/down/up."""
    out = []
    for layer in llm.model_.layers_:
        attn, mlp = layer.state_dict()
        out += [*attn.values(), *mlp.values()]
    return out


def _set_lora_dropout(llm, training: bool, p: float | None = None) -> None:
    # MoE-PEFT keeps its LoRAs in plain dicts, which LLMModel.eval() does not reach: switch them here
    for linear in _peer_linears(llm):
        for lora in linear.loras_.values():
            lora.dropout_.train(training)
            if p is not None:
                lora.dropout_.p = p


def _peer_trainable(llm, name: str) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors by MoE-PEFT's names (its dict also holds the frozen lm_head)."""
    return {k: v for k, v in llm.get_adapter_weight_dict(name).items() if v.requires_grad}


def peer_run(worker, folder: str, b_std: float) -> dict:
    """Step 1 (MoE-PEFT's environment): weights, outputs and gradients of its floor, LoRA and MoLA."""
    from moe_peft.adapters.mola.model import _mixtral_load_balancing_loss_func

    from bench.peers.moe_peft_side import model_input

    ids = worker.ids
    outputs: dict[str, torch.Tensor] = {}
    info: dict = {}
    for variant in ("floor", "lora", "mola"):
        if variant not in worker.variants:
            worker.build(variant)
        llm, name = worker.variants[variant].extra["llm"], worker.variants[variant].extra["adapter"]
        if variant != "floor":
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for linear in _peer_linears(llm):
                    for lora in linear.loras_.values():
                        b = lora.lora_b_.weight
                        b.copy_(torch.randn(b.shape, generator=generator) * b_std)
            weights = _peer_trainable(llm, name)
            save_file(
                {k: v.detach().contiguous() for k, v in weights.items()}, f"{folder}/peer-{variant}-weights.safetensors"
            )
            info[f"{variant}_evaluator_rerun_max_abs_diff"] = _evaluator_reruns(llm, name, ids)
        _set_lora_dropout(llm, False)
        request = model_input(name, ids, labels=False, inference=True, masks=True)
        request.efficient_operator_ = False  # the fused LoRA drops whatever the mode; this path obeys eval
        with torch.no_grad():
            output = llm.forward(request)[0]
        outputs[f"{variant}_logits"] = output.logits.float()
        if variant != "floor":
            outputs.update(_peer_grads(llm, name, ids, variant, efficient=False))
        if variant == "lora":  # its training path: the fused LoRA, at a dropout that drops nothing
            _set_lora_dropout(llm, True, p=NO_DROP)
            request = model_input(name, ids, labels=False, inference=True, masks=True)
            with torch.no_grad():
                outputs["lora_fused_logits"] = llm.forward(request)[0].logits.float()
            outputs.update(_peer_grads(llm, name, ids, "lora_fused", efficient=True))
            _set_lora_dropout(llm, True, p=LORA_DROPOUT)
        _set_lora_dropout(llm, True)
        if variant == "mola":
            outputs["mola_router_logits"] = output.router_logits.float()
            mask = torch.ones(ids.shape, dtype=torch.long)
            loss = _mixtral_load_balancing_loss_func(output.router_logits, EXPERTS, TOP_K, mask)
            outputs["mola_balance_loss"] = loss.detach().reshape(1).float()
    save_file({k: v.contiguous() for k, v in outputs.items()}, f"{folder}/peer-outputs.safetensors")
    info["lora_fused_backward_probe"] = lora_backward_probe(LORA_DROPOUT)
    info["mola_train_after_inference_mode"] = _train_after_inference_mode(worker, ids)
    return info


def _evaluator_reruns(llm, name: str, ids: torch.Tensor) -> float:
    """Max |difference| of two forwards run as its evaluator runs them (``moe_peft/evaluator.py``:
    ``inference_mode_`` set, nothing switched to eval); 0 if its evaluation is deterministic."""
    from bench.peers.moe_peft_side import model_input

    llm.eval()
    with torch.no_grad():
        runs = [
            llm.forward(model_input(name, ids, labels=False, inference=True, masks=True))[0].logits for _ in range(2)
        ]
    llm.train()
    return (runs[0] - runs[1]).abs().max().item()


def _peer_grads(llm, name: str, ids: torch.Tensor, key: str, efficient: bool) -> dict[str, torch.Tensor]:
    """Gradients of the language-model loss (its own, ``CasualOutputLayer.loss``) w.r.t. the adapter."""
    from bench.peers.moe_peft_side import model_input

    weights = _peer_trainable(llm, name)
    request = model_input(name, ids, labels=True, inference=False, masks=True)
    request.efficient_operator_ = efficient
    llm.forward(request)[0].loss.backward()
    grads = {f"{key}_grad/{k}": v.grad.detach().clone() for k, v in weights.items()}
    for v in weights.values():
        v.grad = None
    return grads


def lora_backward_probe(p: float, seed: int = 0) -> dict:
    """MoE-PEFT's fused LoRA (``LoraFunction``, its training default) against autograd of the same
    forward on the same dropout mask: relative gradient differences of A, B and the input, and
    whether its A and input gradients equal the mask-free formula its backward writes."""
    import torch.nn.functional as F
    from moe_peft.common import LLMBatchConfig, LLMModelInput
    from moe_peft.common.lora_linear import LoraFunction

    generator = torch.Generator().manual_seed(seed)
    batch, seq, d_in, d_out, r, scaling = 2, 32, 64, 48, R, 2.0
    x = torch.randn(batch, seq, d_in, generator=generator).requires_grad_()
    a = torch.randn(r, d_in, generator=generator).requires_grad_()
    b = torch.randn(d_out, r, generator=generator).requires_grad_()
    base, upstream = (
        torch.randn(batch, seq, d_out, generator=generator),
        torch.randn(batch, seq, d_out, generator=generator),
    )
    batch_args = LLMModelInput(
        batch_configs_=[LLMBatchConfig(adapter_name_="p", batch_start_idx_=0, batch_end_idx_=batch)]
    )

    def grads(forward) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(seed)  # the same dropout mask on both paths (one F.dropout call each)
        out = forward()
        (out * upstream).sum().backward()
        found = [t.grad.clone() for t in (x, a, b)]
        for t in (x, a, b):
            t.grad = None
        return out.detach(), found

    fused_out, fused = grads(lambda: LoraFunction.apply(base.clone(), x, batch_args, [p], [scaling], a, b))
    auto_out, auto = grads(lambda: base + (F.dropout(x, p) * scaling) @ a.t() @ b.t())
    with torch.no_grad():  # what its backward computes (lora_linear.py, LoraFunction.backward): no mask
        stage = upstream @ b * (scaling / (1 - p))
        mask_free_a, mask_free_x = (stage.transpose(1, 2) @ x).sum(0), stage @ a

    def rel(u: torch.Tensor, v: torch.Tensor) -> float:
        return ((u - v).norm() / v.norm()).item()

    return {
        "dropout": p,
        "forward_max_abs_diff": (fused_out - auto_out).abs().max().item(),
        "grad_rel_diff": {
            "input": rel(fused[0], auto[0]),
            "lora_A": rel(fused[1], auto[1]),
            "lora_B": rel(fused[2], auto[2]),
        },
        "grad_equals_mask_free_formula": {
            "input": torch.allclose(fused[0], mask_free_x, rtol=1e-5, atol=1e-5),
            "lora_A": torch.allclose(fused[1], mask_free_a, rtol=1e-5, atol=1e-5),
        },
    }


def _train_after_inference_mode(worker, ids: torch.Tensor) -> str:
    """A MoLA training step after one forward under ``torch.inference_mode`` (as its evaluator and
    generator decorate theirs): 'ok', or the error. MoE-PEFT caches an index tensor module-wide
    (``lora_linear.py``, ``get_range_tensor``); one made in inference mode cannot be saved for backward."""
    import moe_peft.common.lora_linear as lora_linear

    from bench.peers.moe_peft_side import model_input

    built = worker.variants["mola"]
    llm, name = built.extra["llm"], built.extra["adapter"]
    lora_linear.g_cached_range_tensor.clear()
    try:
        with torch.inference_mode():
            llm.forward(model_input(name, ids, labels=True, inference=True, masks=False))
        built.train_step(ids)
        return "ok"
    except RuntimeError as err:
        return f"RuntimeError: {str(err).split('.')[0]}"
    finally:
        lora_linear.g_cached_range_tensor.clear()  # later steps in this process get a normal one


# ---------------------------------------------------------------------------- mosld side
def mosld_run(worker, folder: str) -> dict:
    """Step 2 (the project's environment): MoE-PEFT's weights in mosld ``lora``/``mola`` and peft; outputs."""
    import mosld
    from mosld.adapters.mixture import load_balancing_loss, routing_probs, topk_gates

    ids = worker.ids
    outputs: dict[str, torch.Tensor] = {}
    for variant in ("floor", "lora", "peft_lora", "mola"):
        if variant not in worker.variants:
            worker.build(variant)
        model = worker.variants[variant].extra["model"]
        source = "mola" if variant == "mola" else "lora"
        views = {} if variant == "floor" else peer_views(model, variant)
        if views:
            load_peer_weights(views, load_file(f"{folder}/peer-{source}-weights.safetensors"))
        router_logits: list[torch.Tensor] = []
        hooks = [
            layer.register_forward_hook(
                lambda m, args, _out, found=router_logits: found.append(
                    args[0].reshape(-1, m.in_features) @ m.lora_router.weight.t()
                )
            )
            for layer in mosld.adapter_layers(model).values()
            if layer.lora_router is not None
        ]
        model.eval()
        with torch.no_grad():
            outputs[f"{variant}_logits"] = model(input_ids=ids).logits.float()
        for hook in hooks:
            hook.remove()
        model.train()
        if variant != "floor":
            # the training forward with its dropout at 0 (mosld's and peft's LoRA dropout modules)
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
            model(input_ids=ids, labels=ids).loss.backward()
            outputs.update({f"{variant}_grad/{k}": param.grad[index].clone() for k, (param, index) in views.items()})
            model.zero_grad(set_to_none=True)
        if variant == "mola":
            outputs["mola_router_logits"] = torch.cat(router_logits)
            # the balancing loss as training computes it (layer.route; mean over layers), dropout off
            mosld.set_aux_loss(model, True)
            with torch.no_grad():
                model(input_ids=ids)
            outputs["mola_balance_loss"] = mosld.aux_loss(model).reshape(1).float()
            mosld.set_aux_loss(model, False)
            per_layer = [
                load_balancing_loss(routing_probs(logits), topk_gates(logits, TOP_K), TOP_K) for logits in router_logits
            ]
            outputs["mola_balance_loss_per_layer"] = torch.stack(per_layer).float()
    save_file({k: v.contiguous() for k, v in outputs.items()}, f"{folder}/mosld-outputs.safetensors")
    return {}


Index = tuple[slice, ...]


def peer_views(model: torch.nn.Module, variant: str) -> dict[str, tuple[torch.Tensor, Index]]:
    """Each MoE-PEFT adapter tensor's place in mosld (or peft): its name -> (parameter, index).

    MoE-PEFT (``get_adapter_weight_dict``): ``base_model.model.model.layers.L.self_attn.P.lora_{A,B}.weight``
    (LoRA) and ``mola.layers.L.self_attn.P.{moe_gate.weight, experts.E.lora_{A,B}.weight}`` (MoLA).
    mosld stacks the experts: ``lora_A`` rows ``E*r:(E+1)*r`` and ``lora_B`` columns ``E*r:(E+1)*r``
    are expert E's. The index applies to the parameter and to its gradient alike.
    """
    import mosld
    from mosld.adapters.inject import layer_index

    everything = (slice(None),)
    views: dict[str, tuple[torch.Tensor, Index]] = {}
    if variant == "peft_lora":
        for name, module in model.named_modules():
            if "default" in getattr(module, "lora_A", {}):
                key = f"base_model.model.model.layers.{layer_index(name)}.self_attn.{name.rsplit('.', 1)[-1]}"
                views[f"{key}.lora_A.weight"] = (module.lora_A["default"].weight, everything)
                views[f"{key}.lora_B.weight"] = (module.lora_B["default"].weight, everything)
        return views
    for name, layer in mosld.adapter_layers(model).items():
        projection, index = name.rsplit(".", 1)[-1], layer_index(name)
        if layer.num_experts == 1:
            key = f"base_model.model.model.layers.{index}.self_attn.{projection}"
            views[f"{key}.lora_A.weight"] = (layer.lora_A, everything)
            views[f"{key}.lora_B.weight"] = (layer.lora_B, everything)
            continue
        key = f"mola.layers.{index}.self_attn.{projection}"
        views[f"{key}.moe_gate.weight"] = (layer.lora_router.weight, everything)
        for expert in range(layer.num_experts):
            rows = slice(expert * R, (expert + 1) * R)
            views[f"{key}.experts.{expert}.lora_A.weight"] = (layer.lora_A, (rows,))
            views[f"{key}.experts.{expert}.lora_B.weight"] = (layer.lora_B, (slice(None), rows))
    return views


def load_peer_weights(views: dict[str, tuple[torch.Tensor, Index]], weights: dict[str, torch.Tensor]) -> None:
    """Copy MoE-PEFT's adapter tensors into their places; every tensor must have exactly one."""
    if set(views) != set(weights):
        raise KeyError(
            f"names differ: only MoE-PEFT {sorted(set(weights) - set(views))[:4]}, "
            f"only ours {sorted(set(views) - set(weights))[:4]}"
        )
    with torch.no_grad():
        for key, (param, index) in views.items():
            param[index].copy_(weights[key])


# ---------------------------------------------------------------------------- comparison
def compare(peer: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], info: dict) -> dict:
    """The figures of the cross-check from both sides' outputs."""
    from mosld.adapters.mixture import load_balancing_loss, routing_probs, topk_gates

    def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a - b).abs().max().item()

    floor_diff = max_diff(ours["floor_logits"], peer["floor_logits"])
    tolerance = max(TOLERANCE_FACTOR * floor_diff, TOLERANCE_FLOOR)
    result: dict = {"floor_logits_max_abs_diff": floor_diff, "logits_tolerance": tolerance, "grad_rtol": GRAD_RTOL}
    for ours_name, peer_name in PAIRS:
        diff = max_diff(ours[f"{ours_name}_logits"], peer[f"{peer_name}_logits"])
        effect = max_diff(peer[f"{peer_name}_logits"], peer["floor_logits"])
        prefix = f"{peer_name}_grad/"
        names = [k[len(prefix) :] for k in peer if k.startswith(prefix)]
        grad_diff = max(max_diff(ours[f"{ours_name}_grad/{k}"], peer[prefix + k]) for k in names)
        grad_scale = max(peer[prefix + k].abs().max().item() for k in names)
        result[f"{ours_name}_vs_{peer_name}"] = {
            "logits_max_abs_diff": diff,
            "logits_max_abs": peer[f"{peer_name}_logits"].abs().max().item(),
            "adapter_effect_max_abs": effect,  # how far the adapter moves the logits: the scale of the check
            "logits_within_tolerance": diff <= tolerance,
            "grad_tensors": len(names),
            "grad_max_abs_diff": grad_diff,
            "grad_max_abs": grad_scale,
            "grad_rel_diff": grad_diff / grad_scale,
            "grad_within_tolerance": grad_diff <= GRAD_RTOL * grad_scale,
        }
    ours_router, peer_router = ours["mola_router_logits"], peer["mola_router_logits"]
    same_experts = (
        ours_router.topk(TOP_K, dim=-1).indices.sort(-1).values
        == peer_router.topk(TOP_K, dim=-1).indices.sort(-1).values
    )
    result["mola_vs_mola"].update(
        router_logits_max_abs_diff=max_diff(ours_router, peer_router),
        tokens_with_same_top2=same_experts.all(-1).float().mean().item(),
        routed_rows=ours_router.shape[0],
    )
    # Balancing losses: each side's own, and each re-derived from the other side's router logits.
    layers = ours["mola_balance_loss_per_layer"].numel()
    peer_chunks = peer_router.chunk(layers)
    mosld_on_peer = torch.stack(
        [load_balancing_loss(routing_probs(c), topk_gates(c, TOP_K), TOP_K) for c in peer_chunks]
    ).mean()
    pooled = load_balancing_loss(routing_probs(ours_router), topk_gates(ours_router, TOP_K), TOP_K)
    result["balance_loss"] = {
        "moe_peft": peer["mola_balance_loss"].item(),
        "mosld": ours["mola_balance_loss"].item(),
        "mosld_formula_on_moe_peft_router_logits": mosld_on_peer.item(),
        "top_k_x_mosld_formula_pooled_over_all_layers_on_mosld_router_logits": TOP_K * pooled.item(),
        "routed_layers": layers,
    }
    result.update(info)
    return result


def main(argv: list[str] | None = None) -> int:
    from bench.peers.compare import PEER_PYTHON, WorkerProcess, prepare_base

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--b-std", type=float, default=0.05, help="std of the random LoRA B (their init is 0)")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu-peers-crosscheck.json"))
    args = parser.parse_args(argv)
    if not args.peer_python.exists():
        raise SystemExit(f"{args.peer_python} is missing: run `bash bench/peers/setup_env.sh` first")
    base = "embedded" if args.shape == "smollm2" else "random"
    with tempfile.TemporaryDirectory(prefix="mosld-crosscheck-") as tmp:
        config, weights = prepare_base(args.shape, base, 0, Path(tmp))
        ids = torch.randint(0, config["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        workers = {
            "moe_peft": WorkerProcess("moe_peft", args.peer_python, 1, "cpu"),
            "mosld": WorkerProcess("mosld", sys.executable, 1, "cpu"),
        }
        try:
            versions = {}
            for side, worker in workers.items():
                versions[side] = worker(
                    "init", threads=1, device="cpu", dtype="float32", config=config, weights=weights, seed=0
                )
                worker("set_ids", ids=ids.tolist())
            info = workers["moe_peft"]("call", function="crosscheck.peer_run", folder=tmp, b_std=args.b_std)
            workers["mosld"]("call", function="crosscheck.mosld_run", folder=tmp)
            result = compare(
                load_file(f"{tmp}/peer-outputs.safetensors"), load_file(f"{tmp}/mosld-outputs.safetensors"), info
            )
        finally:
            for worker in workers.values():
                worker.close()
    result.update(shape=args.shape, base=base, batch=args.batch, seq=args.seq, b_std=args.b_std, versions=versions)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    checks = [v for k, v in result.items() if k.endswith(tuple(f"_vs_{p}" for _, p in PAIRS))]
    agree = all(c["logits_within_tolerance"] and c["grad_within_tolerance"] for c in checks)
    print(f"cross-check: {'every pair within tolerance' if agree else 'DIFFERENCES BEYOND TOLERANCE'}", file=sys.stderr)
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
