"""Activation checkpointing of the adapted model without double-counted routing.

transformers' gradient checkpointing (non-reentrant ``torch.utils.checkpoint``) runs every decoder
layer's forward a second time during backward. That recomputation must not add the layer's routing
statistics again nor replace its balancing loss: the adapter layers ask ``is_recomputing()`` and
leave both alone while it is true. The recomputed forward draws the same DropConnect and dropout
masks (checkpoint restores the RNG state), so gradients equal the run without checkpointing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from .inject import adapter_layers
from .layer import is_recomputing, recomputing

__all__ = ["enable_gradient_checkpointing", "is_recomputing"]


@contextlib.contextmanager
def _recomputation(masks: dict[nn.Module, Tensor | None]) -> Iterator[None]:
    """The recomputed forward, with each adapter layer's padding mask as it was in the first forward
    (the model-level hooks that set it ran then; the balancing loss must see the same tokens)."""
    with recomputing():
        for layer, mask in masks.items():
            layer.token_mask = mask
        try:
            yield
        finally:
            for layer in masks:
                layer.token_mask = None


def enable_gradient_checkpointing(model: nn.Module, every_n_layers: int = 1, offload: bool = False) -> nn.Module:
    """Turn on the model's own (transformers) activation checkpointing, non-reentrant, recompute-aware.

    Non-reentrant checkpointing needs no input that requires grad, so a frozen embedding is fine.
    ``every_n_layers`` (checkpoint every n-th decoder layer) and ``offload`` (keep the saved activations in host
    memory) are transformers' own options (``activation_checkpointing_enable``, transformers 5.x).
    Raises ValueError for a model that does not support it, or options its transformers does not have.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} does not support transformers' gradient checkpointing"
        )
    layers: list[nn.Module] = []

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``torch.utils.checkpoint``'s ``context_fn``, called as each layer's first forward starts."""
        if not layers:  # adapters are injected after checkpointing is enabled
            layers.extend(adapter_layers(model).values())
        return contextlib.nullcontext(), _recomputation({layer: layer.token_mask for layer in layers})

    kwargs = {"use_reentrant": False, "context_fn": contexts}
    # passed only when set, so that a transformers whose method lacks them still takes the defaults
    options = {"every_n_layers": every_n_layers, "offload": offload} if (every_n_layers, offload) != (1, False) else {}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
    elif options:
        raise ValueError(
            f"gradient_checkpointing: every_n_layers and offload need transformers' activation_checkpointing_enable "
            f"(transformers 5.x); {type(model).__name__} has only gradient_checkpointing_enable"
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # transformers turns the cache off in training with checkpointing anyway
    return model
