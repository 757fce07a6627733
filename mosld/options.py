"""Option types shared by the classes the command line configures.

An option's range is its type (jsonargparse's ``PositiveInt``, ``PositiveFloat``, ..., ``TokenBudget`` here),
which jsonargparse checks as it parses, naming the option. It hands the checked values over as instances of those
types, which must not reach a checkpoint (``torch.load(weights_only=True)`` refuses them): ``builtin_arguments``
turns them back into ``int`` and ``float`` where a configured class receives them.
"""

from __future__ import annotations

import functools

from jsonargparse.typing import restricted_number_type

# A sequence's token budget: the shortest prompt + answer worth training on.
TokenBudget = restricted_number_type("TokenBudget", int, (">=", 8))


def builtin(value):
    """``value`` with jsonargparse's checked numbers (also inside dicts and lists) as plain ``int`` / ``float``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, dict, list)):
        return value
    if isinstance(value, dict):
        return {k: builtin(v) for k, v in value.items()}
    if isinstance(value, list):
        return [builtin(v) for v in value]
    return int(value) if isinstance(value, int) else float(value)


def builtin_arguments(init):
    """Decorate an ``__init__`` so that it receives its arguments as ``builtin`` values."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        return init(self, *map(builtin, args), **{k: builtin(v) for k, v in kwargs.items()})

    return wrapper
