"""Routing over several vLLM engines: prefix-cache affinity bounded by load, health, draining.

Pure domain code: no I/O, no clock of its own but the one it is given, no framework.
"""

from .engine import BreakerSettings, BreakerState, CircuitBreaker, Engine, Gauges, Load
from .fleet import (
    Decision,
    EngineSnapshot,
    Fleet,
    FleetError,
    NoEngineAvailable,
    Outcome,
    Ticket,
    UnknownEngine,
    UnknownModel,
)
from .policy import (
    Candidate,
    Choice,
    LeastLoad,
    PrefixAffinity,
    Query,
    Reason,
    RoundRobin,
    RoutingPolicy,
    policy_named,
)
from .prefix import (
    BLOCK_BYTES,
    PrefixIndex,
    RequestFeatures,
    block_hashes,
    render_chat,
    render_prompt,
)

__all__ = [
    "BLOCK_BYTES",
    "BreakerSettings",
    "BreakerState",
    "Candidate",
    "Choice",
    "CircuitBreaker",
    "Decision",
    "Engine",
    "EngineSnapshot",
    "Fleet",
    "FleetError",
    "Gauges",
    "LeastLoad",
    "Load",
    "NoEngineAvailable",
    "Outcome",
    "PrefixAffinity",
    "PrefixIndex",
    "Query",
    "Reason",
    "RequestFeatures",
    "RoundRobin",
    "RoutingPolicy",
    "Ticket",
    "UnknownEngine",
    "UnknownModel",
    "block_hashes",
    "policy_named",
    "render_chat",
    "render_prompt",
]
