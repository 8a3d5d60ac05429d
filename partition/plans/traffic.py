"""What one call puts on the wire: the ring model, the metric payload, per-role totals."""

from __future__ import annotations

from dataclasses import dataclass

# J's reduction: [loss sum, Σ‖W‖² of this rank's (shards of) weights, correct] in float64.
METRIC_BYTES = 3 * 8


def ring_wire_bytes(op: str, n: int, p: int) -> int:
    """Bytes one rank puts on the wire for a payload of n bytes among p ranks (ring model).

    all-reduce 2(p−1)/p·n (reduce-scatter then all-gather of n/p pieces), all-gather
    (p−1)·n with n this rank's piece, reduce-scatter (p−1)/p·n, broadcast n; a
    point-to-point send puts its payload on the wire.
    """
    if op == "send":
        return n
    if p <= 1:
        return 0
    if op == "all_reduce":
        return 2 * (p - 1) * n // p
    if op == "all_gather":
        return (p - 1) * n
    if op == "reduce_scatter":
        return (p - 1) * n // p
    if op == "broadcast":
        return n
    raise ValueError(f"no wire model for {op!r}")


@dataclass(frozen=True)
class RoleTraffic:
    """One role's traffic on one rank in one step: payload bytes, calls, ring wire bytes."""

    bytes: int
    messages: int
    wire: int


@dataclass(frozen=True)
class Call:
    """One collective of one rank in one step: what it hands in, what reaches it."""

    role: str
    phase: str
    op: str  # all_reduce | all_gather | reduce_scatter
    payload: int  # bytes this rank hands in (an all-gather's padded piece)
    received: int  # bytes that reach this rank from the others
    wire: int  # ring-model bytes this rank puts on the wire


def collective(role: str, phase: str, op: str, n: int, p: int, received: int = 0) -> Call:
    return Call(role, phase, op, n, received, ring_wire_bytes(op, n, p))


def metric_call(p: int) -> Call:
    """The J reduction every multi-rank step ends with (role and phase `metric`)."""
    return collective("metric", "metric", "all_reduce", METRIC_BYTES, p)


def by_role(calls: list[Call]) -> dict[str, RoleTraffic]:
    out: dict[str, RoleTraffic] = {}
    for c in calls:
        t = out.get(c.role, RoleTraffic(0, 0, 0))
        out[c.role] = RoleTraffic(t.bytes + c.payload, t.messages + 1, t.wire + c.wire)
    return out
