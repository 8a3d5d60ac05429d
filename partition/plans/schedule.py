"""Pipeline schedules as data: per-rank action lists, their validation and their lowering. Pure.

A schedule is, per rank, an ordered list of compute actions on *global* stage indices:

    F  forward of a micro-batch through the stage (the last stage also computes the loss)
    B  full backward of a micro-batch: I then W
    I  input gradient only, ∂J/∂h = Wᵀ ∂J/∂o (what the previous stage waits for)
    W  weight gradient only, ∂J/∂W = ∂J/∂o hᵀ (+ λW once per step; nobody waits for it)

The text form is PyTorch's compute-only CSV (its pipelining package): a cell is
`<stage><F|B|I|W><microbatch>` (`0F1`, `1B0`, `2I3`), one row per rank, empty cells ignored,
so a schedule written for one engine runs on the other. Which rank holds a stage follows
from the rows (a stage on two ranks is refused).

Sends and receives are never written by hand: they are derived from the compute actions
(`needs`, `produces`). F of stage s sends its output to the rank of stage s+1, B or I of
stage s sends its input gradient to the rank of stage s−1; between stages on one rank the
tensor is handed over locally and nothing crosses.

Messages between two ranks are matched in the order they are posted (gloo without tags,
NCCL), so a rank posts its receives from a peer in the order that peer sends
(`ReceiveOrder`): before the receive an action needs, every earlier message of the same
peer — the rule of torch's lowering, where the sender places the receiver's RECV. A
schedule may therefore need its messages in any order (ZB-V and DualPipeV do).

`validate` proves a schedule complete and deadlock-free before any rank starts: it plays
the action lists with sends that never block (the runtime's sends are non-blocking) and
reports the first wait that can never end. `eager_sends` says whether the runtime may
also wait for each send right after posting the next receive (so a sent tensor is freed
at once, as a blocking send would), which it proves by playing the schedule under NCCL's
rule that a send completes only once its receive is posted.
"""

from __future__ import annotations

import csv
import io
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

KINDS = ("F", "B", "I", "W")
# One stage per rank here; the others (several stages per rank, the split backward) in
# plans/generators.py.
NAMED = ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "zb1p", "zbv", "dualpipev")
_CELL = re.compile(r"^(\d+)([FBIW])(\d+)$")


class ScheduleError(ValueError):
    """A schedule that cannot run: the message names the rank, the position and the action."""


@dataclass(frozen=True, order=True)
class Action:
    stage: int
    kind: str  # F | B | I | W
    mb: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.mb}"

    @classmethod
    def parse(cls, text: str) -> Action:
        m = _CELL.match(text.strip())
        if not m:
            raise ScheduleError(f"{text.strip()!r} is not an action: cells are "
                                f"<stage><F|B|I|W><microbatch>, e.g. 0F1")
        return cls(int(m.group(1)), m.group(2), int(m.group(3)))


@dataclass(frozen=True)
class Message:
    """A tensor one stage hands the next (or previous) one for micro-batch `mb`."""

    role: str  # activation (F's output, forward) | activation_grad (B/I's input gradient)
    from_stage: int
    to_stage: int
    mb: int


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists and the stage -> rank map."""

    name: str = field(compare=False)  # where it came from; two equal orders are one schedule
    ranks: tuple[tuple[Action, ...], ...] = ()
    stage_rank: tuple[int, ...] = ()
    micro: int = 1

    @property
    def world(self) -> int:
        return len(self.ranks)

    @property
    def stages(self) -> int:
        return len(self.stage_rank)

    def rank_stages(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_rank) if r == rank]

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for acts in self.ranks:
            w.writerow([str(a) for a in acts])
        return buf.getvalue()


# ---------------------------------------------------------------- generators


def gpipe_actions(stage: int, stages: int, micro: int) -> list[Action]:
    """GPipe (Huang et al., 2019): all forwards, then all backwards in the same order.

    Every stage holds all M micro-batches' activations; with equal stages and free
    communication the idle fraction is (P−1)/(M+P−1).
    """
    _check(stage, stages, micro)
    return ([Action(stage, "F", m) for m in range(micro)]
            + [Action(stage, "B", m) for m in range(micro)])


def one_f_one_b_actions(stage: int, stages: int, micro: int) -> list[Action]:
    """1F1B (PipeDream-Flush, Narayanan et al., 2021): warm-up forwards, then one forward /
    one backward, then the cool-down backwards.

    Stage i warms up with min(P−i−1, M) forwards, so it never holds more than
    min(P−i, M) micro-batches of activations; same bubble as GPipe, (P−1)/(M+P−1).
    """
    _check(stage, stages, micro)
    warmup = min(stages - stage - 1, micro)
    acts = [Action(stage, "F", m) for m in range(warmup)]
    b = 0
    for f in range(warmup, micro):  # steady state
        acts += [Action(stage, "F", f), Action(stage, "B", b)]
        b += 1
    return acts + [Action(stage, "B", m) for m in range(b, micro)]  # cool-down


def one_stage_per_rank(name: str, world: int, micro: int) -> Schedule:
    gen = {"gpipe": gpipe_actions, "1f1b": one_f_one_b_actions}[name]
    return Schedule(name, tuple(tuple(gen(r, world, micro)) for r in range(world)),
                    tuple(range(world)), micro)


def named_schedule(name: str, *, world: int, micro: int, virtual: int | None = None) -> Schedule:
    """A named schedule with `virtual` stages per rank (None: the schedule's own number)."""
    return _named(name, world, micro, virtual)


@lru_cache(maxsize=64)
def _named(name: str, world: int, micro: int, virtual: int | None) -> Schedule:
    from partition.plans import generators  # it builds on this module

    if name not in NAMED:
        raise ScheduleError(f"unknown schedule {name!r}; expected one of {NAMED} or a .csv file")
    generators.virtual_stages(name, virtual)
    if name in ("gpipe", "1f1b"):
        return one_stage_per_rank(name, world, micro)
    return generators.generate(name, world=world, micro=micro, virtual=virtual)


def load_schedule(schedule: str, *, world: int, micro: int, virtual: int | None = None) -> Schedule:
    """A named schedule, or the path of a compute-only CSV (read here), validated.

    `virtual` (strategy.virtual_stages) is the stages per rank of a named schedule; a CSV
    says itself which rank holds which stage, and `virtual`, if given, must agree.
    """
    if schedule in NAMED:
        return named_schedule(schedule, world=world, micro=micro, virtual=virtual)
    if not schedule.endswith(".csv"):
        raise ScheduleError(f"unknown schedule {schedule!r}; expected one of {NAMED} or a .csv file")
    try:
        with open(schedule, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ScheduleError(f"cannot read the schedule file: {e.strerror or e}") from None
    s = from_csv(text, name=schedule, world=world, micro=micro)
    if virtual is not None:
        per_rank = sorted({len(s.rank_stages(r)) for r in range(s.world)})
        if per_rank != [virtual]:
            raise ScheduleError(f"{schedule} holds {'/'.join(map(str, per_rank))} stages per rank, "
                                f"not virtual_stages={virtual}")
    return s


def parse_csv(text: str, *, name: str = "csv") -> tuple[list[list[Action]], tuple[int, ...]]:
    """Rows of actions and the stage -> rank map the rows imply."""
    rows: list[list[Action]] = []
    for line in csv.reader(io.StringIO(text)):
        rows.append([Action.parse(c) for c in line if c.strip()])
    while rows and not rows[-1]:
        rows.pop()
    if not rows:
        raise ScheduleError(f"{name}: no actions")
    owner: dict[int, int] = {}
    for r, acts in enumerate(rows):
        for i, a in enumerate(acts):
            if owner.setdefault(a.stage, r) != r:
                raise ScheduleError(f"rank {r} action {i} ({a}): stage {a.stage} is already on "
                                    f"rank {owner[a.stage]}; a stage lives on one rank")
    stages = max(owner) + 1
    missing = [s for s in range(stages) if s not in owner]
    if missing:
        raise ScheduleError(f"{name}: stage {missing[0]} has no actions (stages 0..{stages - 1} "
                            f"appear)")
    return rows, tuple(owner[s] for s in range(stages))


def from_csv(text: str, *, name: str, world: int, micro: int) -> Schedule:
    rows, stage_rank = parse_csv(text, name=name)
    if len(rows) != world:
        raise ScheduleError(f"{name} has {len(rows)} rank rows; world_size is {world}")
    s = Schedule(name, tuple(tuple(r) for r in rows), stage_rank, micro)
    validate(s)
    return s


# ---------------------------------------------------------------- dependencies


def produces(a: Action, stages: int) -> Message | None:
    """What `a` hands to another stage: F's output forward, B/I's input gradient back."""
    if a.kind == "F" and a.stage < stages - 1:
        return Message("activation", a.stage, a.stage + 1, a.mb)
    if a.kind in ("B", "I") and a.stage > 0:
        return Message("activation_grad", a.stage, a.stage - 1, a.mb)
    return None


def needs(a: Action, stages: int) -> Message | None:
    """What `a` waits for from another stage."""
    if a.kind == "F" and a.stage > 0:
        return Message("activation", a.stage - 1, a.stage, a.mb)
    if a.kind in ("B", "I") and a.stage < stages - 1:
        return Message("activation_grad", a.stage + 1, a.stage, a.mb)
    return None


def _producer(msg: Message) -> tuple[int, str]:
    """(stage, kind) of the action that makes `msg`; a gradient comes from B or I."""
    return (msg.from_stage, "F" if msg.role == "activation" else "BI")


def _local_deps(a: Action) -> list[tuple[int, str, int]]:
    """Same-stage prerequisites: B/I need their F, W needs its I."""
    if a.kind in ("B", "I"):
        return [(a.stage, "F", a.mb)]
    if a.kind == "W":
        return [(a.stage, "I", a.mb)]
    return []


def deps(a: Action, stages: int) -> list[tuple[int, str, int]]:
    """Every action `a` waits for, as (stage, kinds, mb): kinds 'BI' means B or I."""
    out = _local_deps(a)
    n = needs(a, stages)
    if n is not None:
        s, k = _producer(n)
        out.append((s, k, n.mb))
    return out


def transfers(s: Schedule, rank: int) -> tuple[list[Message], list[Message]]:
    """What `rank` receives and sends in one step, each in program order (crossings only)."""
    recv, send = [], []
    for a in s.ranks[rank]:
        n, p = needs(a, s.stages), produces(a, s.stages)
        if n is not None and s.stage_rank[n.from_stage] != rank:
            recv.append(n)
        if p is not None and s.stage_rank[p.to_stage] != rank:
            send.append(p)
    return recv, send


# ---------------------------------------------------------------- validation


def validate(s: Schedule) -> None:
    """Complete, well-ordered and deadlock-free, or ScheduleError naming the action."""
    M = s.micro
    if M < 1:
        raise ScheduleError(f"{M} micro-batches: need at least 1")
    for r, acts in enumerate(s.ranks):
        seen: dict[tuple[int, str, int], int] = {}
        for i, a in enumerate(acts):
            where = f"rank {r} action {i} ({a})"
            if s.stage_rank[a.stage] != r:
                raise ScheduleError(f"{where}: stage {a.stage} is on rank {s.stage_rank[a.stage]}")
            if not 0 <= a.mb < M:
                raise ScheduleError(f"{where}: micro-batch {a.mb} outside 0..{M - 1}")
            key = (a.stage, a.kind, a.mb)
            if key in seen:
                raise ScheduleError(f"{where} repeats action {seen[key]}")
            if a.kind == "B" and (a.stage, "I", a.mb) in seen or a.kind in ("I", "W") and (
                    a.stage, "B", a.mb) in seen:
                raise ScheduleError(f"{where}: micro-batch {a.mb} of stage {a.stage} has both B "
                                    f"and I/W; B is I then W")
            for ds, dk, dm in _local_deps(a):
                if (ds, dk, dm) not in seen:
                    raise ScheduleError(f"{where} comes before {ds}{dk}{dm} on the same rank")
            seen[key] = i
        for st in s.rank_stages(r):
            for m in range(M):
                has_b = (st, "B", m) in seen
                has_iw = (st, "I", m) in seen, (st, "W", m) in seen
                if (st, "F", m) not in seen:
                    raise ScheduleError(f"rank {r}: stage {st} never runs {st}F{m}")
                if not has_b and not all(has_iw):
                    miss = "B" if not any(has_iw) else "W" if has_iw[0] else "I"
                    raise ScheduleError(f"rank {r}: stage {st} never runs {st}{miss}{m}")
    _check_deadlock(s)


def _check_deadlock(s: Schedule) -> None:
    """Play the lists with non-blocking sends; a rank waits only for what it receives."""
    done: set[tuple[int, str, int]] = set()
    pos = [0] * s.world
    progress = True
    while progress:
        progress = False
        for r in range(s.world):
            acts = s.ranks[r]
            while pos[r] < len(acts) and _ready(acts[pos[r]], s.stages, done):
                a = acts[pos[r]]
                done.add((a.stage, a.kind, a.mb))
                pos[r] += 1
                progress = True
    blocked = [r for r in range(s.world) if pos[r] < len(s.ranks[r])]
    if not blocked:
        return
    r = min(blocked, key=lambda q: (pos[q], q))
    a = s.ranks[r][pos[r]]
    want = _missing(a, s.stages, done)
    q = s.stage_rank[want[0]]
    name = _dep_name(want)
    head = f"rank {r} action {pos[r]} ({a}) waits for {name}"
    if q == r:
        raise ScheduleError(f"{head}, which comes later on the same rank: deadlock")
    b = s.ranks[q][pos[q]]
    their = _missing(b, s.stages, done)
    if (b.stage, b.mb) == (want[0], want[2]) and b.kind in want[1]:
        raise ScheduleError(f"{head}, which waits for rank {s.stage_rank[their[0]]}: deadlock")
    raise ScheduleError(f"{head}, which rank {q} only sends after {b}, which waits for rank "
                        f"{s.stage_rank[their[0]]}: deadlock")


def _ready(a: Action, stages: int, done: set[tuple[int, str, int]]) -> bool:
    return not _missing(a, stages, done)


def _missing(a: Action, stages: int, done: set[tuple[int, str, int]]) -> tuple[int, str, int] | tuple:
    for st, kinds, m in deps(a, stages):
        if not any((st, k, m) in done for k in kinds):
            return (st, kinds, m)
    return ()


def _dep_name(dep: tuple[int, str, int]) -> str:
    st, kinds, m = dep
    return f"{st}{kinds}{m}" if len(kinds) == 1 else f"{st}B{m} (or {st}I{m})"


def sent_order(s: Schedule, rank: int) -> dict[int, list[Message]]:
    """Per peer, the messages it sends `rank` in one step, in the order it sends them."""
    out: dict[int, list[Message]] = {}
    # only the ranks holding a stage next to one of rank's can send it anything (and a
    # dry run asks this for each of up to 1024 ranks)
    mine = s.rank_stages(rank)
    near = {s.stage_rank[t] for st in mine for t in (st - 1, st + 1) if 0 <= t < s.stages}
    for q in sorted(near):
        if q != rank:
            msgs = [m for m in transfers(s, q)[1] if s.stage_rank[m.to_stage] == rank]
            if msgs:
                out[q] = msgs
    return out


class ReceiveOrder:
    """When a rank posts which receive, for one step.

    Messages between two ranks are matched in the order they are posted (gloo without
    tags; NCCL), so the receives from one peer are posted in the order that peer sends:
    `upto(msg)` is what to post before `msg` can be waited for — every message of the same
    peer sent before it and not yet posted, then `msg` itself (nothing if it already is).
    """

    def __init__(self, order: dict[int, list[Message]], stage_rank: Sequence[int]) -> None:
        self._queues = {q: deque(msgs) for q, msgs in order.items()}
        self._stage_rank = stage_rank
        self._posted: set[Message] = set()

    @classmethod
    def of(cls, s: Schedule, rank: int) -> ReceiveOrder:
        return cls(sent_order(s, rank), s.stage_rank)

    def upto(self, msg: Message) -> list[Message]:
        if msg in self._posted:
            return []
        queue = self._queues[self._stage_rank[msg.from_stage]]
        out: list[Message] = []
        while not out or out[-1] != msg:
            out.append(queue.popleft())  # validate() ensures msg is in the peer's sends
        self._posted.update(out)
        return out


# ---------------------------------------------------------------- the runtime's send policy


@lru_cache(maxsize=16)  # every rank's runner asks, and a dry run builds up to 1024 of them
def eager_sends(s: Schedule) -> bool:
    """True when every send may be waited for right after the rank posts the receive of its
    next action (a sent buffer is then freed at once, as a blocking send would free it),
    under NCCL's rule that a send completes only once its receive is posted.

    The runtime posts each action's receive (after the same peer's earlier messages,
    `ReceiveOrder`) just before the action (or, lookahead, right after the previous
    action's sends); proved here by playing exactly that program.
    """
    programs = [comm_program(s, r) for r in range(s.world)]
    posted: set[Message] = set()  # receives posted
    issued: set[Message] = set()  # sends posted
    pos = [0] * s.world
    progress = True
    while progress:
        progress = False
        for r in range(s.world):
            prog = programs[r]
            while pos[r] < len(prog):
                op, msg = prog[pos[r]]
                if op == "compute":
                    pass
                elif op == "post_recv":
                    posted.add(msg)
                elif op == "isend":
                    issued.add(msg)
                elif op == "wait_recv" and msg not in issued:
                    break
                elif op == "wait_send" and msg not in posted:
                    break
                pos[r] += 1
                progress = True
    return all(pos[r] == len(programs[r]) for r in range(s.world))


def comm_program(s: Schedule, rank: int, *, eager: bool = True) -> list[tuple[str, Any]]:
    """The runtime's program for `rank` (runner.py's `_run`): ("compute", action) and its
    communication — ("post_recv" | "wait_recv" | "isend" | "wait_send", message). Each
    action's receive is posted (after the same peer's earlier messages, `ReceiveOrder`)
    just before it, or right after the previous action's sends; with `eager`, each send
    is waited for right after that, else every send at the end of the step."""
    ops: list[tuple[str, Any]] = []
    acts = s.ranks[rank]
    order = ReceiveOrder.of(s, rank)
    late: list[Message] = []

    def remote_need(a: Action) -> Message | None:
        n = needs(a, s.stages)
        return n if n is not None and s.stage_rank[n.from_stage] != rank else None

    for i, a in enumerate(acts):
        n = remote_need(a)
        if n is not None:
            ops += [("post_recv", m) for m in order.upto(n)]
            ops.append(("wait_recv", n))
        ops.append(("compute", a))
        p = produces(a, s.stages)
        out = p if p is not None and s.stage_rank[p.to_stage] != rank else None
        if out is not None:
            ops.append(("isend", out))
        if i + 1 < len(acts):
            nxt = remote_need(acts[i + 1])
            if nxt is not None:
                ops += [("post_recv", m) for m in order.upto(nxt)]
        if out is not None:
            if eager:
                ops.append(("wait_send", out))
            else:
                late.append(out)
    return ops + [("wait_send", m) for m in late]


# ---------------------------------------------------------------- reading a schedule


def in_flight(actions: Iterable[Action]) -> dict[int, int]:
    """Per stage, the most micro-batches whose activations are held at once: from F until
    their B, or until their W (an I keeps the inputs its deferred W needs)."""
    live: dict[int, int] = {}
    peak: dict[int, int] = {}
    for a in actions:
        if a.kind == "F":
            live[a.stage] = live.get(a.stage, 0) + 1
            peak[a.stage] = max(peak.get(a.stage, 0), live[a.stage])
        elif a.kind in ("B", "W"):
            live[a.stage] -= 1
    return peak


def held_at_once(actions: Iterable[Action]) -> int:
    """The most micro-batches a rank holds at once over all its stages, each from its F
    until its B or W: what the runtime reports as `in_flight_max`."""
    live = peak = 0
    for a in actions:
        live += 1 if a.kind == "F" else -1 if a.kind in ("B", "W") else 0
        peak = max(peak, live)
    return peak


def max_in_flight(actions: Sequence[Action]) -> int:
    return max(in_flight(actions).values(), default=0)


def gpipe_bubble(stages: int, micro: int) -> float:
    """Idle fraction of an ideal GPipe or 1F1B step with equal stages: (P−1)/(M+P−1)."""
    return (stages - 1) / (micro + stages - 1)


def time_slots(s: Schedule) -> list[list[Action | None]]:
    """Each rank's actions placed in unit time slots (every action one slot, communication
    free), None where the rank idles: the grid `experiments.schedule` prints."""
    finish: dict[tuple[int, str, int], int] = {}
    rows: list[list[Action | None]] = [[] for _ in range(s.world)]
    pos = [0] * s.world
    while any(pos[r] < len(s.ranks[r]) for r in range(s.world)):
        t = max(len(row) for row in rows) if rows else 0
        moved = False
        for r in range(s.world):
            if pos[r] >= len(s.ranks[r]):
                continue
            a = s.ranks[r][pos[r]]
            start = len(rows[r])
            ready = 0
            for st, kinds, m in deps(a, s.stages):
                ends = [finish[(st, k, m)] for k in kinds if (st, k, m) in finish]
                if not ends:
                    ready = None
                    break
                ready = max(ready, min(ends))
            if ready is None:
                continue
            while len(rows[r]) < max(start, ready):
                rows[r].append(None)
            rows[r].append(a)
            finish[(a.stage, a.kind, a.mb)] = len(rows[r])
            pos[r] += 1
            moved = True
        if not moved:  # validate() rules this out; guard against an unvalidated schedule
            raise ScheduleError(f"schedule {s.name} cannot be laid out (t={t})")
    width = max(len(row) for row in rows)
    return [row + [None] * (width - len(row)) for row in rows]


def format_grid(s: Schedule) -> str:
    """Ranks as rows, time slots as columns, '.' where a rank idles."""
    slots = time_slots(s)
    cells = [[str(a) if a is not None else "." for a in row] for row in slots]
    w = max((len(c) for row in cells for c in row), default=1)
    head = "rank  " + " ".join(f"{t:<{w}}" for t in range(len(cells[0]) if cells else 0))
    lines = [head] + [f"{r:<4}  " + " ".join(f"{c:<{w}}" for c in row)
                      for r, row in enumerate(cells)]
    idle = sum(c == "." for row in cells for c in row)
    total = sum(len(row) for row in cells)
    lines.append(f"{s.name}: {s.world} ranks, {s.stages} stages, {s.micro} micro-batches; "
                 f"{idle} of {total} slots idle ({idle / total:.0%}) with unit actions and "
                 f"free communication")
    return "\n".join(lines)


def _check(stage: int, stages: int, micro: int) -> None:
    if stages < 1 or micro < 1 or not 0 <= stage < stages:
        raise ValueError(f"stage {stage} of {stages} with {micro} micro-batches is not a schedule")
