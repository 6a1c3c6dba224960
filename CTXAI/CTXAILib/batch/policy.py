"""Which predicted regions a batch explains: every one, the low-confidence ones, and/or a seeded sample.

A policy is a union of terms joined by ``+`` (or ``,``): ``all``, ``confidence<T`` (a region whose mean confidence
is below ``T``, in (0, 1]) and ``sample=P%`` (each region with probability ``P`` %). The sample is decided per
region by a hash of the seed, the scan's input hash and the region's number, so that one seed picks the same regions
every time, whatever the order of the scans, the number of workers or the other scans in the batch.

>>> policy = Policy.parse("confidence<0.9+sample=25%", seed=7)
>>> policy.select(0.5, "ab" * 32, 3), policy.select(1.0, "ab" * 32, 3)
('low_confidence', None)
>>> Policy.parse("Sample=25% + confidence<0.9", seed=7).to_dict()
{'text': 'confidence<0.9+sample=25%', 'all': False, 'confidence_below': 0.9, 'sample_percent': 25.0, 'seed': 7}
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

__all__ = ["Policy"]

_SYNTAX = "all, confidence<T (T in (0, 1]) and/or sample=P% (P in [0, 100]), joined by '+'"


@dataclass(frozen=True)
class Policy:
    """A parsed ``--policy``; ``select`` says why a region is explained (None: it is not)."""

    text: str
    all: bool = False
    confidence_below: float | None = None
    sample_percent: float | None = None
    seed: int = 0

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> Policy:
        terms = [t.replace(" ", "") for t in re.split(r"[+,]", text or "") if t.strip()]
        if not terms:
            raise InputError(f"--policy is empty. Give {_SYNTAX}, for example 'confidence<0.9+sample=25%'.")
        everything, below, percent = False, None, None
        for term in terms:
            low = term.lower()
            threshold = re.fullmatch(r"confidence<([0-9.]+)", low)
            sample = re.fullmatch(r"sample=([0-9.]+)%", low)
            try:
                if low == "all":
                    everything = True
                elif threshold and 0.0 < float(threshold.group(1)) <= 1.0:
                    below = max(float(threshold.group(1)), below or 0.0)
                elif sample and 0.0 <= float(sample.group(1)) <= 100.0:
                    percent = max(float(sample.group(1)), percent or 0.0)
                else:
                    raise ValueError(term)
            except ValueError:
                raise InputError(f"--policy term {term!r} is not understood. Give {_SYNTAX}, for example "
                                 "'confidence<0.9+sample=25%'.") from None
        # The text is rebuilt from the terms so that one policy, however written, resumes one batch.
        parts = ["all"] if everything else []
        parts += [] if below is None else [f"confidence<{below:g}"]
        parts += [] if percent is None else [f"sample={percent:g}%"]
        text = "+".join(parts)
        return cls(text, everything, below, percent, int(seed))

    def sampled(self, input_sha256: str, region_id: int) -> bool:
        """Whether the seeded sample takes region ``region_id`` of the scan whose input hash is ``input_sha256``."""
        if not self.sample_percent:
            return False
        digest = hashlib.sha256(f"ctxai-sample:{self.seed}:{input_sha256}:{region_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64 < self.sample_percent / 100.0

    def select(self, mean_confidence: float, input_sha256: str, region_id: int) -> str | None:
        """``"all"``, ``"low_confidence"``, ``"sample"`` (the first term that takes the region) or None."""
        if self.all:
            return "all"
        if self.confidence_below is not None and mean_confidence < self.confidence_below:
            return "low_confidence"
        if self.sampled(input_sha256, region_id):
            return "sample"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "all": self.all, "confidence_below": self.confidence_below,
                "sample_percent": self.sample_percent, "seed": self.seed}
