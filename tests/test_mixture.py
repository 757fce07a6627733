"""The equations of mosld/adapters/mixture.py: routing, DropConnect, the balancing loss."""

from __future__ import annotations

import pytest
import torch

from mosld.adapters.mixture import dropconnect, load_balancing_loss, mixture_delta, routing_probs, topk_gates


@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_gates_have_exactly_k_nonzeros_summing_to_one(num_experts):
    logits = torch.randn(200, num_experts, dtype=torch.float64)
    probs, gates = routing_probs(logits), topk_gates(logits, 2)
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(200, dtype=gates.dtype))
    torch.testing.assert_close(probs.sum(-1), torch.ones(200, dtype=probs.dtype))
    # the kept experts are the two most probable ones, in proportion to their probabilities
    assert ((gates > 0) == (probs >= probs.topk(2).values[:, -1:])).all()
    kept = probs * (gates > 0)
    torch.testing.assert_close(gates, kept / kept.sum(-1, keepdim=True))


def test_routing_probs_are_at_least_fp32():
    assert routing_probs(torch.randn(3, 4, dtype=torch.bfloat16)).dtype == torch.float32
    assert routing_probs(torch.randn(3, 4, dtype=torch.float64)).dtype == torch.float64


def test_dropconnect_is_unbiased_and_drops_with_probability_p():
    weight = torch.randn(8, 16, dtype=torch.float64)
    torch.manual_seed(0)
    draws = torch.stack([dropconnect(weight, 0.1) for _ in range(4000)])
    kept = (draws != 0).double().mean()
    assert abs(kept.item() - 0.9) < 0.005
    torch.testing.assert_close(draws.mean(0), weight, atol=0.05, rtol=0)
    assert torch.allclose(draws[0][draws[0] != 0], weight[draws[0] != 0] / 0.9)


def test_shared_b_sums_the_gated_codes_before_the_one_b():
    x, r, n = torch.randn(5, 6, dtype=torch.float64), 2, 3
    weight_a, weight_b = torch.randn(n * r, 6, dtype=torch.float64), torch.randn(4, r, dtype=torch.float64)
    gates = topk_gates(torch.randn(5, n, dtype=torch.float64), 2)
    expected = sum(gates[:, k : k + 1] * (x @ weight_a[k * r : (k + 1) * r].t()) for k in range(n)) @ weight_b.t()
    torch.testing.assert_close(mixture_delta(x, weight_a, weight_b, gates, r, 1.5), 1.5 * expected)


def test_balancing_loss_is_one_when_balanced_and_n_when_collapsed():
    probs = torch.full((8, 4), 0.25, dtype=torch.float64, requires_grad=True)
    gates = torch.eye(4, dtype=torch.float64).repeat(2, 1)
    loss = load_balancing_loss(probs, gates, top_k=1)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0
    skewed = torch.tensor([[1.0, 0, 0, 0]] * 8, dtype=torch.float64)
    assert load_balancing_loss(skewed, skewed, top_k=1).item() == pytest.approx(4.0)


def test_balancing_loss_leaves_out_tokens_of_weight_zero():
    probs = torch.softmax(torch.randn(6, 4, dtype=torch.float64), -1)
    gates = topk_gates(probs.log(), 2)
    weight = torch.tensor([1, 1, 1, 1, 0, 0])
    torch.testing.assert_close(
        load_balancing_loss(probs, gates, 2, weight), load_balancing_loss(probs[:4], gates[:4], 2)
    )
