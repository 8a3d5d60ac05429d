"""What crosses each pipeline stage boundary, and what one device moves, from the ledger.

Pure functions of the ranks' ledger records (no torch, no processes), called where
result.json is built:

- `p2p_sends(records)`: the point-to-point sends of one step that carry the pipeline's
  traffic (roles `activation` forward, `activation_grad` backward), as plain dicts a
  rank can hand back to the launcher;
- `boundaries({rank: sends})`: one entry per stage boundary, `{from_stage, to_stage,
  from_rank, to_rank, forward_bytes, backward_bytes, messages}` — the activation that
  goes from stage k to stage k+1 and the gradient that comes back, per training step;
- `device_bytes(comm)`: the bytes one device moves per step, split into training
  traffic and the `metric` reduction of J (reported apart: it is not what partitioning
  costs, and it is the same 24 bytes whatever the strategy).

"Bytes per device" everywhere (console, report, benchmark) means what one rank sends
point-to-point or hands to a collective in one training step, training roles only; a
table's figure for a run is the largest over its ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

FORWARD_ROLE = "activation"
BACKWARD_ROLE = "activation_grad"
# Not training traffic: the reduction of J (and, for torch's engines, their one-off votes).
NOT_TRAINING = ("metric", "metadata")


def p2p_sends(records: Iterable[Any]) -> list[dict[str, Any]]:
    """The sends among `records` (comm.CommRecord) that cross a stage boundary."""
    return [{"peer": r.peer, "role": r.role, "bytes": r.sent} for r in records
            if r.op == "send" and r.role in (FORWARD_ROLE, BACKWARD_ROLE)]


def boundaries(sends_by_rank: Mapping[int, Iterable[Mapping[str, Any]]], *,
               stage_of: Mapping[int, int] | None = None) -> list[dict[str, int]]:
    """Per stage boundary, the bytes each way in one step, sorted by stage.

    A boundary is named by the direction of the forward pass: an activation that rank a
    sends to rank b and the gradient that b sends back to a cross the same boundary
    (a → b). `stage_of[rank]` is the stage a rank holds (default: the rank itself, one
    stage per rank). `messages` counts the sends both ways.
    """
    acc: dict[tuple[int, int], dict[str, int]] = {}
    for rank, sends in sends_by_rank.items():
        for s in sends:
            if s["role"] == FORWARD_ROLE:
                key, field = (rank, s["peer"]), "forward_bytes"
            elif s["role"] == BACKWARD_ROLE:
                key, field = (s["peer"], rank), "backward_bytes"
            else:
                continue
            b = acc.setdefault(key, {"forward_bytes": 0, "backward_bytes": 0, "messages": 0})
            b[field] += int(s["bytes"])
            b["messages"] += 1
    stage = (lambda r: stage_of[r]) if stage_of is not None else (lambda r: r)
    out = [{"from_stage": stage(a), "to_stage": stage(b), "from_rank": a, "to_rank": b, **v}
           for (a, b), v in acc.items()]
    return sorted(out, key=lambda x: (x["from_stage"], x["to_stage"]))


def device_bytes(comm: Mapping[str, Any] | None) -> tuple[int | None, int]:
    """(training bytes, metric bytes) one rank moved in a step, from its `ranks[].comm`."""
    if not isinstance(comm, Mapping):
        return None, 0
    roles = comm.get("by_role")
    if not isinstance(roles, Mapping):
        parts = [comm.get("sent_bytes"), comm.get("collective_bytes")]
        if all(p is None for p in parts):
            return None, 0
        return int(sum(p or 0 for p in parts)), 0
    train = sum(int((v or {}).get("bytes") or 0) for k, v in roles.items() if k not in NOT_TRAINING)
    metric = sum(int((v or {}).get("bytes") or 0) for k, v in roles.items() if k in NOT_TRAINING)
    return train, metric


def short_bytes(n: int | float) -> str:
    """1,024 B · 40.0 KiB · 8.0 MiB (binary units; exact below 10 KiB)."""
    v = float(n)
    if abs(v) < 10 * 1024:
        return f"{int(v):,} B"
    if abs(v) < 1024**2:
        return f"{v / 1024:.1f} KiB"
    if abs(v) < 1024**3:
        return f"{v / 1024**2:.1f} MiB"
    return f"{v / 1024**3:.2f} GiB"


def describe(bounds: Iterable[Mapping[str, int]]) -> str:
    """`stage 0→1: 2.0 MiB fwd, 2.0 MiB bwd (8 msgs)` for each boundary, joined by `; `."""
    return "; ".join(
        f"stage {b['from_stage']}→{b['to_stage']}: {short_bytes(b['forward_bytes'])} fwd, "
        f"{short_bytes(b['backward_bytes'])} bwd ({b['messages']} msgs)" for b in bounds)


__all__ = ["BACKWARD_ROLE", "FORWARD_ROLE", "NOT_TRAINING", "boundaries", "describe",
           "device_bytes", "p2p_sends", "short_bytes"]
