"""Per-server ``pinning`` settings (parsed here, enforced by gateway.inspect.pinning)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config.reader import Reader


@dataclass(frozen=True, slots=True)
class PinningConfig:
    mode: str = "off"


def parse_pinning(s: Reader, ctx: dict[str, Any]) -> PinningConfig:
    sub = s.mapping("pinning")
    cfg = PinningConfig(mode=sub.str("mode", "off", choices=("off", "warn", "enforce", "tofu")))
    sub.done()
    return cfg
