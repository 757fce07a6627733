"""The paper's claims on a results page: the comparison that tests each, the paper's own effect size beside
it, Holm's adjustment over all the claims of a page, and the sentence that states the verdict.

A claim's raw verdict is its comparison's (``Comparison.verdict``: the seed-aware 95% interval against 0, or
*borderline* where the Monte Carlo error of an interval end holds 0). The page makes several claims, so each
also gets a family-wise verdict from Holm's adjustment of the claims' bootstrap p-values: *holds* or *is
reversed* only if the adjusted p is below 0.05 across its Monte Carlo band, *borderline* where the band holds
0.05.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .stats import MC_LEVEL, Comparison, holm

ALPHA = 0.05
METHOD_ORDER = ["base", "lora", "mola", "mosl", "mosld", "share_b"]
NAMES = {"base": "base (zero-shot)", "lora": "LoRA", "mola": "MoLA", "mosl": "MoSL", "mosld": "MoSLD",
         "share_b": "share B"}  # fmt: skip
# The paper's Table 1 (LLaMA-2-7B, accuracy %, mean of 3 runs): per task in PAPER_TASKS' order, then the average
# as printed (the mean of the six rounded values differs from it in the last digit for some rows).
PAPER_TASKS = ("openbookqa", "commonsense_qa", "race", "mctest", "arc_easy", "arc_challenge")
PAPER_TABLE: dict[tuple[str, str], tuple[float, ...]] = {
    ("lora", "single"): (75.40, 76.33, 76.06, 53.10, 73.82, 62.71, 69.57),
    ("lora", "mixture"): (72.80, 76.30, 78.23, 55.67, 70.87, 61.00, 69.15),
    ("mola", "single"): (74.60, 77.23, 75.29, 44.90, 72.73, 60.80, 67.59),
    ("mola", "mixture"): (76.60, 73.46, 75.25, 54.42, 76.34, 63.91, 70.00),
    ("mosl", "single"): (76.30, 77.56, 74.63, 49.66, 76.30, 60.48, 69.16),
    ("mosl", "mixture"): (76.80, 75.02, 74.69, 58.50, 76.09, 64.16, 70.88),
    ("mosld", "single"): (78.40, 75.84, 76.08, 53.06, 76.35, 61.49, 70.20),
    ("mosld", "mixture"): (78.80, 76.43, 76.96, 54.42, 76.60, 66.13, 71.56),
    ("share_b", "single"): (77.60, 75.76, 74.58, 46.94, 76.09, 60.83, 68.63),
    ("share_b", "mixture"): (76.40, 74.11, 75.25, 56.46, 77.15, 65.02, 70.73),
}
# The paper's orderings (Table 1 and 2): (better, worse, what it tests).
PAPER_ORDERINGS = [
    ("mosld", "lora", "MoSLD beats LoRA"),
    ("mosld", "mola", "MoSLD beats MoLA"),
    ("mosld", "mosl", "dropout on the shared A helps (MoSLD beats MoSL)"),
    ("mosld", "share_b", "sharing A beats sharing B"),
    ("mola", "lora", "a mixture (MoLA) beats LoRA"),
]


def paper_value(method: str, setting: str, tasks: list[str]) -> float | None:
    """The paper's accuracy (a fraction) of ``method`` in ``setting``, averaged over ``tasks``, or ``None`` where
    the paper has no such number (another method, setting or task)."""
    row = PAPER_TABLE.get((method, setting))
    if row is None or not tasks or any(t not in PAPER_TASKS for t in tasks):
        return None
    if set(tasks) == set(PAPER_TASKS):
        return row[-1] / 100
    return float(np.mean([row[PAPER_TASKS.index(t)] for t in tasks])) / 100


def paper_averages(setting: str) -> str:
    """The paper's six-task averages of every method in ``setting``, for a page's reference sentence."""
    return ", ".join(f"{NAMES[m]} {PAPER_TABLE[(m, setting)][-1]:.2f}" for m in METHOD_ORDER if m != "base")


def paper_difference(a: tuple[str, str], b: tuple[str, str], tasks: list[str]) -> float | None:
    """The paper's ``a - b`` (each a (method, setting)) on the average of ``tasks``, as a fraction."""
    values = [paper_value(*key, tasks) for key in (a, b)]
    return None if None in values else values[0] - values[1]


@dataclass
class Claim:
    """One claim of the paper tested on a page: ``text`` (what it says), ``where`` (the setting or task it is
    tested in), ``label`` (the comparison, ``a − b``), the comparison, the paper's own ``a − b`` (``None``: no
    number in the paper), a balanced-accuracy comparison beside it (out-of-domain multiple choice), the number
    of seeds compared, and the
    Holm-adjusted p-value with its Monte Carlo band (``adjust``)."""

    text: str
    where: str
    label: str
    comparison: Comparison
    paper: float | None = None
    balanced: Comparison | None = None
    seeds: int = 0
    holm_p: float = 1.0
    holm_band: tuple[float, float] = (1.0, 1.0)
    family: int = 1
    note: str = field(default="")

    def holm_verdict(self) -> str:
        """The verdict after Holm's adjustment over the page's claims (``adjust``)."""
        if self.holm_band[1] < ALPHA:
            return "holds" if self.comparison.diff > 0 else "is reversed"
        if self.holm_band[0] < ALPHA:
            return "is borderline"
        return "is within noise"


def adjust(claims: list[Claim]) -> None:
    """Holm's adjustment of the claims' p-values, as one family; the Monte Carlo band of each adjusted p is the
    adjustment of the bands' ends (the adjustment is monotone in every p)."""
    if not claims:
        return
    adjusted = holm([c.comparison.p for c in claims])
    lows = holm([c.comparison.p_band[0] for c in claims])
    highs = holm([c.comparison.p_band[1] for c in claims])
    for claim, p, low, high in zip(claims, adjusted, lows, highs, strict=True):
        claim.holm_p, claim.holm_band, claim.family = p, (low, high), len(claims)


def points(value: float) -> str:
    return f"{100 * value:+.2f}"


def interval(bounds: tuple[float, float]) -> str:
    return f"[{points(bounds[0])}, {points(bounds[1])}]"


def p_text(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else "< 0.001"


def monte_carlo_note(c: Comparison) -> str:
    """For a borderline comparison: the interval end whose Monte Carlo band holds 0, and the band."""
    end = c.unsettled_end()
    if end is None:
        return ""
    value, band = (c.seeds[0], c.low_band) if end == "lower" else (c.seeds[1], c.high_band)
    return (f"; the interval's {end} end {points(value)} has a {MC_LEVEL:.0%} Monte Carlo band {interval(band)} at "
            f"{c.resamples:,} resamples: another bootstrap seed could move it across 0")  # fmt: skip


def effect_text(claim: Claim) -> str:
    """Whether this page's interval excludes the paper's own effect size."""
    if claim.paper is None:
        return " The paper gives no number for this comparison here."
    place = claim.comparison.place(claim.paper)
    verdict = {
        "above": "above this interval: excluded at this scale",
        "below": "below this interval: excluded at this scale",
        "inside": "inside this interval: cannot tell",
        "at the edge": "at the edge of this interval (within the Monte Carlo band of an end): cannot tell",
    }[place]
    return f" The paper's own {points(claim.paper)} is {verdict}."


def sentence(claim: Claim) -> str:
    """The claim's line on the page: raw verdict with its intervals, Holm's verdict, the paper's effect size."""
    c = claim.comparison
    line = (
        f"- {claim.where}: *{claim.text}* **{c.verdict()}** here ({claim.label}: {points(c.diff)} points, 95% "
        f"interval over seeds and items {interval(c.seeds)}, over items only {interval(c.items)}; bootstrap "
        f"p = {p_text(c.p)}{monte_carlo_note(c)})"
    )
    if claim.balanced is not None:
        b = claim.balanced
        line += (f"; balanced accuracy {points(b.diff)} {interval(b.seeds)}, which {b.verdict()}"
                 + ("; the two verdicts differ, so the shift of the answer prior decides it" if
                    b.verdict() != c.verdict() else ""))  # fmt: skip
    line += (f". Holm over the page's {claim.family} claims: adjusted p = {p_text(claim.holm_p)}, "
             f"**{claim.holm_verdict()}**.")  # fmt: skip
    return line + effect_text(claim) + claim.note
