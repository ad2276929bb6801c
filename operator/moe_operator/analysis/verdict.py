"""The analysis' verdict on the new revision: one of four results, a message, the figures."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Analysis results.
PASS, FAIL, INCONCLUSIVE, PENDING = "Pass", "Fail", "Inconclusive", "Pending"


@dataclass(frozen=True)
class Verdict:
    """The analysis' verdict on the new revision now (see moe_operator.analysis)."""

    result: str = PENDING
    message: str = ""
    figures: Mapping[str, Any] = field(default_factory=dict)
