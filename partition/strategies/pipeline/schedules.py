"""The order of forward (F) and backward (B) micro-batch work on each stage. Pure.

These lists are the plan; `runner.py` executes the same orders with the
communication each one needs, and the tests check the two agree (the largest
number of micro-batches in flight on every stage).
"""

from __future__ import annotations

Action = tuple[str, int]  # ("F", micro-batch) or ("B", micro-batch)


def gpipe_actions(stage: int, stages: int, micro: int) -> list[Action]:
    """All forwards, then all backwards (first in, first out): every stage holds all M."""
    _check(stage, stages, micro)
    return [("F", m) for m in range(micro)] + [("B", m) for m in range(micro)]


def one_f_one_b_actions(stage: int, stages: int, micro: int) -> list[Action]:
    """Warm-up forwards, then one forward / one backward, then the cool-down backwards.

    Stage i warms up with min(P−i−1, M) forwards, so it never holds more than
    min(P−i, M) micro-batches of activations.
    """
    _check(stage, stages, micro)
    warmup = min(stages - stage - 1, micro)
    acts: list[Action] = [("F", m) for m in range(warmup)]
    f, b = warmup, 0
    for _ in range(micro - warmup):  # steady state
        acts.append(("F", f))
        f += 1
        acts.append(("B", b))
        b += 1
    acts += [("B", m) for m in range(b, micro)]  # cool-down
    return acts


def max_in_flight(actions: list[Action]) -> int:
    live = peak = 0
    for kind, _ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def gpipe_bubble(stages: int, micro: int) -> float:
    """Idle fraction of an ideal GPipe step with equal stages: (P−1)/(M+P−1)."""
    return (stages - 1) / (micro + stages - 1)


def _check(stage: int, stages: int, micro: int) -> None:
    if stages < 1 or micro < 1 or not 0 <= stage < stages:
        raise ValueError(f"stage {stage} of {stages} with {micro} micro-batches is not a schedule")
