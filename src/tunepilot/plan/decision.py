"""A decision: the value tunepilot will use, who chose it, and why (shown to the user)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunepilot.config import AUTO

USER, AUTO_SOURCE, DEFAULT = "user", "auto", "default"


@dataclass(frozen=True)
class Decision:
    value: Any
    source: str  # "user" | "auto" | "default"
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "reason": self.reason}


def given(setting: Any) -> bool:
    """True when the user set the knob (anything but ``auto``)."""
    return setting != AUTO


def user(value: Any, reason: str = "set in the config") -> Decision:
    return Decision(value, USER, reason)
