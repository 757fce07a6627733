"""Adapter configuration: one dataclass that expresses LoRA, MoLA, MoSL, MoSLD and the share-B ablation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Method = Literal["lora", "mola", "mosl", "mosld", "share_b"]
METHODS: tuple[str, ...] = ("lora", "mola", "mosl", "mosld", "share_b")
ADAPTER_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")

# What each method means (docs/method.md, the table under "The layer"). Fields left as None in
# AdapterConfig take these values; anything set explicitly wins.
METHOD_DEFAULTS: dict[str, dict] = {
    "lora": {"share": None, "shared_dropout": 0.0, "num_experts": 1, "top_k": 1},
    "mola": {"share": None, "shared_dropout": 0.0, "num_experts": (8, 6, 4, 2), "top_k": 2},
    "mosl": {"share": "A", "shared_dropout": 0.0, "num_experts": (8, 6, 4, 2), "top_k": 2},
    "mosld": {"share": "A", "shared_dropout": 0.1, "num_experts": (8, 6, 4, 2), "top_k": 2},
    "share_b": {"share": "B", "shared_dropout": 0.1, "num_experts": (8, 6, 4, 2), "top_k": 2},
}


@dataclass
class AdapterConfig:
    """Configuration of the mixture-of-LoRA-experts adapters injected into a causal LM.

    Every method of the paper is a configuration of the same layer (see ``MoSLDLinear``).
    Fields left as ``None`` take the method's default.

    Args:
        method: ``lora`` (one expert, no router), ``mola`` (each expert its own A and B),
            ``mosl`` (one shared A, per-expert B), ``mosld`` (``mosl`` + DropConnect on the
            shared A, the paper's method) or ``share_b`` (Table 2 ablation: shared B with
            DropConnect on B, per-expert A).
        r: LoRA rank of every expert.
        alpha: LoRA scaling numerator; the adapter output is scaled by ``alpha / r``.
        target_modules: Names of the projections to adapt, matched against the last component
            of each module name (``q_proj`` matches ``model.layers.3.self_attn.q_proj``);
            a name containing a dot is matched as a suffix of the full name.
        num_experts: Experts per adapted layer: an int for all layers, a list with one entry
            per decoder layer, or a shorter list spread over contiguous groups of layers of
            (near-)equal size (``(8, 6, 4, 2)`` = quartiles; with 30 layers: 8, 8, 7, 7 layers).
        top_k: Experts kept per token; their probabilities are renormalised to sum to 1.
        share: Which matrix all experts of a projection share: ``"A"`` or ``"B"``; ``None`` takes
            the method's choice (no sharing for ``lora`` and ``mola``).
        shared_dropout: DropConnect probability on the shared matrix during training
            (on A when ``share`` is ``None``). Eq. 2 of the paper; 0 disables it.
        lora_dropout: Ordinary LoRA dropout on the adapter's input activations.
        aux_loss_coef: Weight of the Switch-style load-balancing loss the training loop adds.
        adapter_dtype: Dtype of the adapter and router tensors (independent of the base's).
    """

    method: Method = "mosld"
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    num_experts: int | tuple[int, ...] | None = None
    top_k: int | None = None
    share: Literal["A", "B"] | None = None
    shared_dropout: float | None = None
    lora_dropout: float = 0.0
    aux_loss_coef: float = 0.0
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        defaults = METHOD_DEFAULTS[self.method]
        if self.num_experts is None:
            self.num_experts = defaults["num_experts"]
        if self.top_k is None:
            self.top_k = defaults["top_k"]
        if self.shared_dropout is None:
            self.shared_dropout = defaults["shared_dropout"]
        if self.share is None:
            self.share = defaults["share"]
        if isinstance(self.num_experts, list):
            self.num_experts = tuple(self.num_experts)
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        # By hand, not PositiveInt fields: configs also come from Python and from checkpoints' hyperparameters.
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r: expected an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha: expected a positive number, got {self.alpha!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules: expected one or more module names, got {self.target_modules!r}")
        experts = (self.num_experts,) if isinstance(self.num_experts, int) else tuple(self.num_experts)
        if not experts or not all(isinstance(n, int) and n >= 1 for n in experts):
            raise ValueError(f"num_experts: expected an int >= 1 or a list of them, got {self.num_experts!r}")
        if self.method == "lora" and max(experts) != 1:
            raise ValueError(f"num_experts: method 'lora' has exactly one expert, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k: expected an integer >= 1, got {self.top_k!r}")
        if self.top_k > min(experts) and min(experts) > 1:
            raise ValueError(
                f"top_k: {self.top_k} is more than the {min(experts)} experts of some layer (num_experts={self.num_experts!r})"
            )
        if self.top_k > 1 and max(experts) == 1:
            raise ValueError(
                f"top_k: {self.top_k} is more than the 1 expert per layer (num_experts={self.num_experts!r})"
            )
        if self.share not in ("A", "B", None):
            raise ValueError(f"share: expected 'A', 'B' or None, got {self.share!r}")
        for name in ("shared_dropout", "lora_dropout"):
            p = getattr(self, name)
            if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
                raise ValueError(f"{name}: expected a probability in [0, 1), got {p!r}")
        if not self.aux_loss_coef >= 0:
            raise ValueError(f"aux_loss_coef: expected a number >= 0, got {self.aux_loss_coef!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype: expected one of {', '.join(ADAPTER_DTYPES)}, got {self.adapter_dtype!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def experts_per_layer(self, num_layers: int) -> list[int]:
        """Number of experts of each decoder layer ``0 .. num_layers - 1``.

        A list shorter than ``num_layers`` is spread over contiguous groups; when the layers do
        not divide evenly the earlier groups get one layer more (30 layers, 4 groups: 8, 8, 7, 7).
        """
        if isinstance(self.num_experts, int):
            return [self.num_experts] * num_layers
        groups = list(self.num_experts)
        if len(groups) == num_layers:
            return groups
        if len(groups) > num_layers:
            raise ValueError(
                f"num_experts: {len(groups)} entries for a model with {num_layers} layers; "
                f"give one per layer or fewer (groups of layers)"
            )
        size, extra = divmod(num_layers, len(groups))
        per_layer: list[int] = []
        for g, n in enumerate(groups):
            per_layer += [n] * (size + (1 if g < extra else 0))
        return per_layer

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        if not isinstance(self.num_experts, int):
            d["num_experts"] = list(self.num_experts)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"adapter config: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("num_experts"), list):
            d["num_experts"] = tuple(d["num_experts"])
        if "target_modules" in d:
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)
