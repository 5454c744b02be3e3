"""The value types of a threat model and a gated forward: eps, norm and gate mode, each parsed and validated once
where it enters (the command line, the Python API, a RunConfig) and passed on typed from there.

No torch here: the command line parses its options before any heavy import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction

from miarobust.errors import UserError

#: the precisions a model can be evaluated in: fp32, or under torch.autocast in bf16 or fp16 (the logits in fp32)
PRECISIONS = ("fp32", "bf16", "fp16")

#: the norms of the threat model: the ball's radius is measured per pixel (Linf) or over the whole image (L2)
NORMS = ("Linf", "L2")

#: `run --reuse`: take a finished run's batches only where this code made them, or whatever code did (results/reuse.py)
REUSE_MODES = ("same-code", "any-code")


def parse_norm(norm: str) -> str:
    """`norm` if it is one of NORMS, else a UserError naming them."""
    if norm not in NORMS:
        raise UserError(f"unknown norm '{norm}': use {' or '.join(NORMS)}.")
    return norm


@dataclass(frozen=True)
class Eps:
    """A perturbation budget in [0, 1] pixel units: its value and the text it was given as ('8/255')."""

    value: float
    text: str

    @classmethod
    def parse(cls, eps: float | str | Eps) -> Eps:
        """'8/255', '0.031', '1e-2' or a number; a UserError unless finite and > 0."""
        if isinstance(eps, Eps):
            return eps
        if isinstance(eps, bool) or not isinstance(eps, (str, int, float)):
            raise UserError(f"eps {eps!r} is not a number: write it as 8/255 or 0.031.")
        text = "".join(eps.split()) if isinstance(eps, str) else repr(float(eps))  # ' 8 / 255 ' is 8/255
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                value = float(Fraction(float(num)) / Fraction(float(den)))
            else:
                value = float(text)
        except (ValueError, ZeroDivisionError, OverflowError):
            raise UserError(f"eps '{eps}' is not a number: write it as 8/255 or 0.031.") from None
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"eps '{eps}' must be a finite number > 0, e.g. 8/255.")
        return cls(value, text)

    def __str__(self) -> str:
        return self.text


class GateMode(str, Enum):
    """How an adaptive model's decisions are drawn (models/gates.py says what each mode does)."""

    FULL = "full"
    DETERMINISTIC = "deterministic"
    STOCHASTIC = "stochastic"
    GUMBEL = "gumbel"

    @classmethod
    def parse(cls, value: str | GateMode) -> GateMode:
        """The mode named `value`, or a UserError listing the modes."""
        try:
            return cls(value)
        except ValueError:
            modes = ", ".join(m.value for m in cls if m is not cls.GUMBEL)
            raise UserError(f"unknown gate mode '{value}': use one of {modes} ('gumbel' in training).") from None
