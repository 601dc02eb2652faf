"""The P/D proxy's configuration, on its own so every part of the proxy can read it without
importing the app that wires them together."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ProxyConfig:
    """Backends and timeouts. Timeouts bound each upstream step so no client waits forever."""

    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    connect_timeout_s: float = 5.0
    prefill_timeout_s: float = 300.0  # a whole prefill answer (long prompts on a busy server)
    decode_timeout_s: float = 300.0  # until decode's first byte, and between streamed chunks
    cooldown_s: float = 5.0
    max_connections: int = 1024
