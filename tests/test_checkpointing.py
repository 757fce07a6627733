"""Activation checkpointing: the recomputed forward changes nothing but memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import adapted, tiny_run_args

import mosld
from mosld.adapters.checkpointing import enable_gradient_checkpointing, is_recomputing
from mosld.training.cli import main


def train_step(checkpointing: bool, method: str) -> tuple[torch.Tensor, dict, dict, torch.Tensor]:
    """Loss, adapter gradients, routing statistics and balancing loss of one step with DropConnect on."""
    model = adapted("llama", method, shared_dropout=0.3, lora_dropout=0.2, aux_loss_coef=0.01).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    mosld.set_router_stats(model, True)
    mosld.set_aux_loss(model, True)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # padding, left out of statistics and balancing loss
    torch.manual_seed(7)  # the DropConnect and dropout draws
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    balance = mosld.aux_loss(model)  # None for lora: nothing to balance
    balance = torch.zeros((), dtype=out.loss.dtype) if balance is None else balance
    (out.loss + 0.01 * balance).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = {n: s for n, s in mosld.router_stats(model).items()}
    return out.loss.detach(), grads, stats, balance.detach()


@pytest.mark.parametrize("method", ["mosld", "share_b", "lora"])
def test_checkpointing_gives_the_same_loss_gradients_and_routing_statistics(method):
    loss, grads, stats, balance = train_step(False, method)
    loss_c, grads_c, stats_c, balance_c = train_step(True, method)
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(balance_c, balance, rtol=0, atol=1e-12)
    assert grads.keys() == grads_c.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    assert stats.keys() == stats_c.keys()
    for name in stats:  # counted once: the recomputation adds no tokens
        for key in ("tokens", "load", "mean_prob", "entropy"):
            torch.testing.assert_close(stats_c[name][key], stats[name][key], rtol=0, atol=1e-6, msg=f"{name} {key}")


def test_checkpointing_recomputes_every_decoder_layer_in_backward():
    model = enable_gradient_checkpointing(adapted("llama", "mosld").train())
    seen = []
    layer = mosld.adapter_layers(model)["model.layers.2.self_attn.q_proj"]
    layer.register_forward_hook(lambda *_: seen.append(is_recomputing()))
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen == [False, True]  # the forward, then its recomputation during backward
    assert not is_recomputing()


def test_a_model_without_checkpointing_support_is_refused():
    with pytest.raises(ValueError, match="does not support transformers' gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_cli_fit_with_checkpointing_trains_exactly_as_without(tiny_model_dir, tmp_path):
    losses = []
    for flag in ("false", "true"):
        root = tmp_path / flag
        cli = main(
            tiny_run_args(tiny_model_dir, root, "--trainer.max_steps", "4", "--model.gradient_checkpointing", flag)
        )
        record = json.loads((Path(cli.trainer.log_dir) / "train_record.json").read_text())
        assert record["gradient_checkpointing"] == (flag == "true")
        losses.append([loss for _, loss in record["loss"]])
    assert len(losses[0]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=1e-7)
