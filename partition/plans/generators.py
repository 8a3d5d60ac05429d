"""Pipeline schedules with several stages per rank, and the split backward: generators. Pure.

Each generator returns a `Schedule` (plans/schedule.py): per rank the list of compute
actions on global stage indices, and the stage -> rank layout the schedule needs. Sends
and receives are derived from the actions by the lowering in schedule.py, as for GPipe
and 1F1B, so every schedule here runs on the one pipeline runtime.

    interleaved_1f1b   Megatron's virtual stages, depth first       stage s on rank s mod P
    looped_bfs         the same layout, breadth first               stage s on rank s mod P
    zb1p               ZB-H1: the weight gradient W fills the drain stage s on rank s mod P
    zbv                ZB-V: two stages per rank in a V             rank r: stages r, 2P−1−r
    dualpipev          DeepSeek's DualPipe, V form                  rank r: stages r, 2P−1−r

The orders are those torch 2.13's pipelining package generates
(`ScheduleInterleaved1F1B`, `ScheduleLoopedBFS`, `ScheduleInterleavedZeroBubble`,
`ScheduleZBVZeroBubble`, `ScheduleDualPipeV`: their `pipeline_order` with the empty
slots dropped and an `OVERLAP_F_B` pair written as its two actions), written again here
from the papers' warm-up / steady / cool-down structure so that nothing here imports
torch; tests/test_generators.py compares the two orders action by action. The one
deliberate difference: with one stage per rank (v = 1) `interleaved_1f1b` and `zb1p`
accept any M, where torch also applies its rule for interleaving rounds (M a multiple
of max(1, M // P)), which has no rounds to order when there is a single stage per rank.

Bubble formulas are given per stage (chunk) action time, F for a forward, B = I + W for
a full backward, I for the input gradient, W for the weight gradient, with equal stages
and free communication, as the papers give them; `paper_bubble` returns them. The
simulator (simulate.py) plays the actual action lists and is the authority on what
a list costs; tests/test_generators.py shows where the two agree.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from partition.plans.schedule import Action, Schedule, ScheduleError, validate

# Stages per rank when strategy.virtual_stages is not given.
DEFAULT_VIRTUAL = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "looped_bfs": 2, "zb1p": 1,
                   "zbv": 2, "dualpipev": 2}
# Schedules whose stage count per rank is fixed (a V has exactly two).
FIXED_VIRTUAL = {"gpipe": 1, "1f1b": 1, "zbv": 2, "dualpipev": 2}


def virtual_stages(name: str, virtual: int | None) -> int:
    """Stages per rank of named schedule `name`: `virtual`, or the schedule's own default.

    ScheduleError when the schedule cannot hold that many (GPipe and 1F1B one, a V two).
    """
    if name not in DEFAULT_VIRTUAL:
        raise ScheduleError(f"unknown schedule {name!r}")
    v = DEFAULT_VIRTUAL[name] if virtual is None else virtual
    if v < 1:
        raise ScheduleError(f"{v} stages per rank: need at least 1")
    fixed = FIXED_VIRTUAL.get(name)
    if fixed is not None and v != fixed:
        what = "one stage per rank" if fixed == 1 else "exactly two stages per rank (a V)"
        raise ScheduleError(f"{name} holds {what}, not {v}; interleaved_1f1b, looped_bfs and "
                            f"zb1p take several")
    return v


# ---------------------------------------------------------------- layouts


def round_robin(world: int, virtual: int) -> tuple[int, ...]:
    """Stage s on rank s mod P (Megatron's virtual pipeline): a micro-batch loops v times."""
    return tuple(s % world for s in range(world * virtual))


def v_shape(world: int) -> tuple[int, ...]:
    """Rank r holds stages r and 2P−1−r: down the ranks and back up, so the turn from stage
    P−1 to stage P stays on the last rank and crosses nothing."""
    return tuple(s if s < world else 2 * world - 1 - s for s in range(2 * world))


def _check(world: int, micro: int) -> None:
    if world < 1 or micro < 1:
        raise ScheduleError(f"{world} ranks with {micro} micro-batches is not a schedule")


# ---------------------------------------------------------------- interleaved (Megatron)


def _rounds(name: str, world: int, micro: int, virtual: int) -> int:
    """Micro-batches per round of an interleaved schedule: a rank runs a round of forwards
    on one of its stages before moving to the next. torch's flexible rule: max(1, M // P)
    rounds, which must divide M (Megatron's original schedule needs M a multiple of P)."""
    rounds = max(1, micro // world)
    if virtual > 1 and micro % rounds:
        raise ScheduleError(f"{name} with {virtual} stages per rank runs its micro-batches in "
                            f"{rounds} equal rounds (max(1, M // P) for P={world}); "
                            f"M={micro} is not a multiple of {rounds}")
    return micro // rounds


def _depth_first(rank: int, world: int, micro: int, virtual: int, *, per_round: int,
                 warmup: int, w_from: int | None) -> list[Action]:
    """One rank of a depth-first interleaved schedule: `warmup` forwards, then forward /
    backward pairs, then the remaining backwards; stage of each chosen by round.

    w_from=None: full backwards (B). Otherwise backwards are split, I now and its W
    later: from the (w_from+1)-th steady pair on, each I is followed by the oldest
    pending W, and the pending ones close the list.
    """
    total = virtual * micro  # forwards of this rank (and backwards)

    def fwd_stage(k: int) -> int:  # k-th forward of this rank
        return (k // per_round) % virtual * world + rank

    def bwd_stage(k: int) -> int:  # k-th backward, last stage first
        return (virtual - 1 - (k // per_round) % virtual) * world + rank

    nf: dict[int, int] = defaultdict(int)  # next micro-batch per stage
    nb: dict[int, int] = defaultdict(int)
    nw: dict[int, int] = defaultdict(int)
    backs: list[int] = []  # stages of the backwards so far, in order
    acts: list[Action] = []

    def forward(k: int) -> None:
        s = fwd_stage(k)
        acts.append(Action(s, "F", nf[s]))
        nf[s] += 1

    def backward(k: int) -> None:
        s = bwd_stage(k)
        acts.append(Action(s, "B" if w_from is None else "I", nb[s]))
        nb[s] += 1
        backs.append(s)
        if w_from is not None and k >= w_from:
            weight()

    def weight() -> None:
        s = backs[sum(nw.values())]
        acts.append(Action(s, "W", nw[s]))
        nw[s] += 1

    for k in range(warmup):
        forward(k)
    for k in range(total - warmup):  # steady: the (warmup+k)-th forward, the k-th backward
        forward(warmup + k)
        backward(k)
    for k in range(total - warmup, total):  # cool-down
        backward(k)
    while w_from is not None and sum(nw.values()) < len(backs):
        weight()
    return acts


def interleaved_1f1b(world: int, micro: int, virtual: int = 2) -> Schedule:
    """Interleaved 1F1B: Megatron-LM's virtual pipeline stages (Narayanan et al., "Efficient
    Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", SC'21,
    arXiv:2104.04473, §2.2.2), in torch's flexible form (`ScheduleInterleaved1F1B`).

    The net is cut into P·v stages, stage s on rank s mod P, so each rank holds v thin
    stages and a micro-batch passes every rank v times. Rank r warms up with
    (v−1)·m + 2(P−1−r) forwards (m micro-batches per round, capped at v·M), then
    alternates one forward and one backward, depth first (the earliest micro-batch
    first), then drains. Bubble with equal stages and free communication:
    (P−1)(F+B) per stage action, which is (P−1)(F+B)/v of a whole rank's layers —
    v times smaller than 1F1B's; idle fraction (P−1)/(v·M+P−1). It pays with v times
    the boundary crossings (every stage boundary is between two ranks) and more
    micro-batches in flight at rank 0.
    """
    _check(world, micro)
    v = virtual_stages("interleaved_1f1b", virtual)
    per_round = _rounds("interleaved_1f1b", world, micro, v)
    ranks = []
    for r in range(world):
        warmup = min((v - 1) * per_round + 2 * (world - 1 - r), v * micro)
        ranks.append(tuple(_depth_first(r, world, micro, v, per_round=per_round,
                                        warmup=warmup, w_from=None)))
    return Schedule("interleaved_1f1b", tuple(ranks), round_robin(world, v), micro)


def zb1p(world: int, micro: int, virtual: int = 1) -> Schedule:
    """ZB-H1 of the zero-bubble paper (Qi, Wan, Huang, Lin, "Zero Bubble Pipeline
    Parallelism", ICLR 2024, arXiv:2401.10241, §2.1), with v stages per rank torch's
    `ScheduleInterleavedZeroBubble` (its "ZB1P").

    The backward is split into I (∂J/∂h = Wᵀ ∂J/∂o, which the previous stage waits for)
    and W (∂J/∂W = ∂J/∂o hᵀ + λW, which nobody waits for). Rank r warms up with
    (v−1)·m + (P−1−r) forwards, then runs forward / I pairs; from its (r+1)-th pair on
    each I is followed by the oldest deferred W, and the Ws still pending fill the
    drain, where 1F1B's ranks sit idle. With one stage per rank every rank holds at
    most min(P, M) micro-batches from F to W: 1F1B's count on its first rank, where
    1F1B's rank r holds min(P−r, M). The paper's "1F1B's activation memory" rests on
    W keeping less than B would; here W keeps each layer's x and ∂J/∂z — as much as F
    kept (∂J/∂z replaces z), plus the output layer's ∂J/∂o — so in bytes the later
    ranks hold more than under 1F1B and the peak over the ranks can exceed 1F1B's
    (tests/test_generators.py pins it). Bubble with
    equal stages and free communication: (P−1)(F+B−2W) in this project's notation
    (B = I+W; the paper writes (p−1)(T_F+T_B−T_W) with its B our I), so with
    F = I = W it is (P−1)·F, a third of 1F1B's (P−1)(F+B) = 3(P−1)·F.
    """
    _check(world, micro)
    v = virtual_stages("zb1p", virtual)
    per_round = _rounds("zb1p", world, micro, v)
    ranks = []
    for r in range(world):
        warmup = min((v - 1) * per_round + (world - 1 - r), v * micro)
        ranks.append(tuple(_depth_first(r, world, micro, v, per_round=per_round,
                                        warmup=warmup, w_from=r)))
    return Schedule("zb1p", tuple(ranks), round_robin(world, v), micro)


# ---------------------------------------------------------------- breadth first


def looped_bfs(world: int, micro: int, virtual: int = 2) -> Schedule:
    """Looped breadth-first pipeline (Lamy-Poirier, "Breadth-First Pipeline Parallelism",
    MLSys 2023, arXiv:2211.05953), as torch's `ScheduleLoopedBFS`.

    The interleaved layout (stage s on rank s mod P), run breadth first: each rank runs
    the forwards of every micro-batch on its first stage, then on its next, and so on,
    then the backwards stage by stage from its last, micro-batches in reverse order
    (GPipe looped v times). Every rank holds all M micro-batches on each of its stages.
    Bubble with equal stages and free communication: (P−1)(F+B) per stage action, as
    interleaved 1F1B, when M ≥ P (fewer micro-batches leave a rank waiting between its
    loops); idle fraction (P−1)/(v·M+P−1).
    """
    _check(world, micro)
    v = virtual_stages("looped_bfs", virtual)
    ranks = []
    for r in range(world):
        stages = [r + k * world for k in range(v)]
        acts = [Action(s, "F", m) for s in stages for m in range(micro)]
        acts += [Action(s, "B", m) for s in reversed(stages) for m in reversed(range(micro))]
        ranks.append(tuple(acts))
    return Schedule("looped_bfs", tuple(ranks), round_robin(world, v), micro)


# ---------------------------------------------------------------- V-shaped


def zbv(world: int, micro: int, virtual: int = 2) -> Schedule:
    """ZB-V of the zero-bubble paper (Qi et al., ICLR 2024, arXiv:2401.10241, §6), as torch's
    `ScheduleZBVZeroBubble`.

    Two stages per rank in a V (rank r holds stages r and 2P−1−r), so rank 0 holds both
    the first and the last stage, and the turn at rank P−1 is local. Rank r runs
    2(P−r)−1 forwards of its first stage, r pairs of forwards on both, then P−r rounds
    of F, I, W on its second stage, a steady state of F, I, W on each stage in turn,
    and a drain of Is then the deferred Ws. The activations in flight are 1F1B's
    (counted in whole-rank layers). With F = I = W the paper's ZB-V is bubble-free
    ("bubble rate 0"), counted with the optimizer step's synchronisation bypassed
    (the paper's post-validation, §5), so that successive steps overlap. A step
    here ends with the update and J's all-reduce, so the fill of the first forward,
    (P−1)·F, stays (no order can start rank P−1 before the first micro-batch reaches
    it): the simulated idle is (P−1)·F for M ≥ 2P, an idle fraction
    (P−1)/(6M+P−1) → 0. torch generates the order for max(M, 2P−1) micro-batches and
    drops those ≥ M; so does this.
    """
    _check(world, micro)
    virtual_stages("zbv", virtual)
    P, n = world, max(micro, 2 * world - 1)
    ranks = []
    for r in range(P):
        a, b = r, 2 * P - 1 - r  # the rank's stage going down, and coming back
        f: dict[int, int] = defaultdict(int)  # forwards so far, per stage
        i: dict[int, int] = defaultdict(int)  # input gradients so far, per stage
        acts: list[Action] = []

        def fwd(stage: int) -> None:
            acts.append(Action(stage, "F", f[stage]))
            f[stage] += 1

        def inp(stage: int, *, weight: bool) -> None:  # I, and its W at once if `weight`
            acts.append(Action(stage, "I", i[stage]))
            if weight:
                acts.append(Action(stage, "W", i[stage]))
            i[stage] += 1

        for _ in range(2 * (P - r) - 1):
            fwd(a)
        for _ in range(r):
            fwd(b)
            fwd(a)
        for _ in range(P - r):
            fwd(b)
            inp(b, weight=True)
        while f[b] < f[a] or f[a] < n:  # steady: F I W on each stage in turn
            if f[a] < n:
                fwd(a)
            inp(a, weight=True)
            fwd(b)
            inp(b, weight=True)
        wa, wb = i[a], i[b]  # drain: the Is first, the Ws they leave after
        for _ in range(r):
            inp(a, weight=False)
            inp(b, weight=False)
        for _ in range(P - r):
            inp(a, weight=False)
            acts.append(Action(a, "W", wa))
            wa += 1
        acts += [Action(b, "W", m) for m in range(wb, i[b])]
        acts += [Action(a, "W", m) for m in range(wa, i[a])]
        ranks.append(tuple(x for x in acts if x.mb < micro))
    return Schedule("zbv", tuple(ranks), v_shape(world), micro)


def dualpipev(world: int, micro: int, virtual: int = 2) -> Schedule:
    """DualPipeV: DeepSeek's DualPipe (DeepSeek-AI, "DeepSeek-V3 Technical Report",
    arXiv:2412.19437, §3.2.1) in the V form of its open-source repository
    (deepseek-ai/DualPipe, "cut-in-half"), as torch's `ScheduleDualPipeV` orders it.

    The V layout of ZB-V (rank r holds stages r and 2P−1−r); after a warm-up of forwards,
    the main phase pairs a forward of one stage with a full backward of the other
    (F0 B1 then F1 B0), which DeepSeek runs overlapped, one's compute hiding the
    other's communication (torch's `OVERLAP_F_B`). Here the pair runs as two
    sequential actions, the forward then the backward — on CPU there is one compute
    stream per rank and nothing to overlap, as in torch's own runtime, which runs an
    `OVERLAP_F_B`'s sub-actions one after the other. The tail splits the last
    backwards into I and W to fill the drain. Needs M ≥ 2P micro-batches (torch
    refuses fewer). Bubble (DualPipe README, for DualPipe on 2P ranks, which the V
    form runs on P): (P−1)(F&B + B − 3W) with F&B the time of an overlapped pair;
    run sequentially F&B = F+B, so with F = I = W it is 2(P−1)·F.
    """
    _check(world, micro)
    virtual_stages("dualpipev", virtual)
    P = world
    if micro < 2 * P:
        raise ScheduleError(f"dualpipev needs at least 2P={2 * P} micro-batches (one per "
                            f"stage), got M={micro}")
    ranks = []
    for r in range(P):
        a, b = r, 2 * P - 1 - r
        acts: list[Action] = []
        nf: dict[int, int] = defaultdict(int)
        nb: dict[int, int] = defaultdict(int)  # next backward (B or I) per stage
        pending: list[tuple[int, int]] = []  # deferred Ws, oldest first

        def fwd(stage: int) -> None:
            acts.append(Action(stage, "F", nf[stage]))
            nf[stage] += 1

        def bwd(stage: int, split: bool = False) -> None:
            acts.append(Action(stage, "I" if split else "B", nb[stage]))
            if split:
                pending.append((stage, nb[stage]))
            nb[stage] += 1

        def weight() -> None:
            if pending:
                stage, m = pending.pop(0)
                acts.append(Action(stage, "W", m))

        for _ in range(2 * (P - r - 1)):
            fwd(a)
        for _ in range(r + 1):
            fwd(a)
            fwd(b)
        for _ in range(P - r - 1):
            bwd(b, split=True)
            weight()
            fwd(b)
        for i in range(micro - 2 * P + r + 1):  # main: F0 B1, F1 B0 (overlapped pairs)
            fwd(a)  # rank P−1's first pair is not overlapped in DualPipe; same actions here
            bwd(b)
            fwd(b)
            bwd(a)
        for _ in range(P - r - 1):
            bwd(b)
            fwd(b)
            bwd(a)
        split = False
        steps = r + 1
        for i in range(steps):  # B1 B0, the second half split into I and (later) W
            if i == steps // 2 and r % 2 == 1:
                split = True
            bwd(b, split)
            if i == steps // 2 and r % 2 == 0:
                split = True
            bwd(a, split)
        for _ in range(P - r - 1):
            weight()
            bwd(a, split)
        for _ in range(r + 1):
            weight()
        ranks.append(tuple(acts))
    return Schedule("dualpipev", tuple(ranks), v_shape(world), micro)


GENERATORS: dict[str, Callable[..., Schedule]] = {
    "interleaved_1f1b": interleaved_1f1b, "looped_bfs": looped_bfs, "zb1p": zb1p,
    "zbv": zbv, "dualpipev": dualpipev,
}


def generate(name: str, *, world: int, micro: int, virtual: int | None = None) -> Schedule:
    """The named schedule with `virtual` stages per rank (None: the schedule's default)."""
    if name not in GENERATORS:
        raise ScheduleError(f"unknown schedule {name!r}")
    s = GENERATORS[name](world, micro, virtual_stages(name, virtual))
    validate(s)  # complete and deadlock-free, as a user's CSV must be
    return s


# ---------------------------------------------------------------- the papers' figures


def paper_bubble(name: str, *, world: int, virtual: int = 1, F: float = 1.0, I: float = 1.0,
                 W: float = 1.0) -> float:
    """Idle time per rank and step the schedule's paper gives, for equal stages whose
    actions take F, I, W (B = I + W), with free communication and enough micro-batches.

    gpipe, 1f1b        (P−1)(F+B)                 Huang et al. 2019; Narayanan et al. 2021
    interleaved_1f1b   (P−1)(F+B)  per stage       Narayanan et al. 2021 (v times less per rank)
    looped_bfs         (P−1)(F+B)  per stage       Lamy-Poirier 2023
    zb1p               (P−1)(F+B−2W)               Qi et al. 2024 (ZB-H1)
    zbv                0 (with F = I = W)          Qi et al. 2024 (optimizer sync bypassed)
    dualpipev          (P−1)(F&B+B−3W), F&B = F+B  DualPipe README (overlap run sequentially)
    """
    P, B = world, I + W
    if name in ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs"):
        return (P - 1) * (F + B)
    if name == "zb1p":
        return (P - 1) * (F + B - 2 * W)
    if name == "zbv":
        return 0.0 if F == I == W else (P - 1) * max(0.0, F + I - 2 * W)
    if name == "dualpipev":
        return (P - 1) * ((F + B) + B - 3 * W)
    raise ScheduleError(f"no paper bubble for schedule {name!r}")


def paper_idle_fraction(name: str, *, world: int, micro: int, virtual: int = 1,
                        F: float = 1.0, I: float = 1.0, W: float = 1.0) -> float:
    """The paper's bubble as a share of the step: bubble / (v·M·(F+I+W) + bubble)."""
    bubble = paper_bubble(name, world=world, virtual=virtual, F=F, I=I, W=W)
    work = virtual * micro * (F + I + W)
    return bubble / (work + bubble) if work + bubble > 0 else 0.0
