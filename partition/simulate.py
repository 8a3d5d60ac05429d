"""Discrete-event simulation of a plan: each rank's timeline, the step time, the idle fraction.

Pure (no torch, nothing timed here). A plan becomes a list of `Op`s per rank, in the order
the rank runs them, each with a duration: compute actions, and communication. An op starts
when its rank is free (one compute stream per rank) and every op it depends on has ended
(plus a lag: a message's transfer time); the members of a collective start together, when
the last of them arrives. Durations come from a calibration at the run's own shapes
(calibrate.py) or, in tests, from hand-picked units.

    pipeline_ops    the action lists of a schedule (plans/schedule.py): F/B/I/W per stage and
                    micro-batch, a transfer between stages on different ranks, then the
                    update and the J reduction; one pipeline per (dp, tp) coordinate of a
                    hybrid mesh, with comm ops before and after actions and before the
                    update
    step_ops        one training step of any strategy, from the ranks' calibrated times
    hybrid_ops      a dp × pp × tp mesh's step; fsdp_rank_ops one fsdp rank's
    simulate        the timeline of any ops

Idle fraction of a rank = 1 − (its compute inside the step) / (step time), the same
definition the measured timeline uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from partition.plans.schedule import Action, Message, Schedule, needs


@dataclass(frozen=True)
class Op:
    """One thing a rank does: compute, or its part of a communication."""

    rank: int
    kind: str  # compute | comm
    label: str  # e.g. "0F1", "update", "all_reduce metric"
    duration: float
    deps: tuple[tuple[int, float], ...] = ()  # (index of an op in the flat list, lag)
    sync: str | None = None  # a collective: ops with the same key start together
    args: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Span:
    rank: int
    kind: str
    label: str
    start: float
    end: float
    args: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Timeline:
    spans: list[Span]
    world: int

    # Once per timeline (the spans are not changed after `simulate`): every rank's idle
    # fraction reads both, and a 1024-rank mesh has a million spans.
    @cached_property
    def step_time(self) -> float:
        return max((s.end for s in self.spans), default=0.0)

    @cached_property
    def _compute(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for s in self.spans:
            if s.kind == "compute":
                out[s.rank] = out.get(s.rank, 0.0) + (s.end - s.start)
        return out

    def compute(self, rank: int) -> float:
        return self._compute.get(rank, 0.0)

    def idle_fraction(self, rank: int) -> float:
        t = self.step_time
        return 1.0 - self.compute(rank) / t if t > 0 else 0.0

    def rank_spans(self, rank: int) -> list[Span]:
        return [s for s in self.spans if s.rank == rank]


def simulate(ops: list[Op], world: int) -> Timeline:
    """Play the ops: each rank in its own order, deps and collectives honoured."""
    per_rank: list[list[int]] = [[] for _ in range(world)]
    for i, op in enumerate(ops):
        per_rank[op.rank].append(i)
    members: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        if op.sync is not None:
            members.setdefault(op.sync, []).append(i)
    end: dict[int, float] = {}
    start: dict[int, float] = {}
    free = [0.0] * world
    pos = [0] * world

    def ready(i: int) -> float | None:
        t = free[ops[i].rank]
        for d, lag in ops[i].deps:
            if d not in end:
                return None
            t = max(t, end[d] + lag)
        return t

    remaining = len(ops)
    while remaining:
        moved = False
        for r in range(world):
            while pos[r] < len(per_rank[r]):
                i = per_rank[r][pos[r]]
                op = ops[i]
                if op.sync is None:
                    t = ready(i)
                    if t is None:
                        break
                    start[i], end[i] = t, t + op.duration
                    free[r] = end[i]
                    pos[r] += 1
                    remaining -= 1
                    moved = True
                    continue
                group = members[op.sync]
                # every member must be at its turn (the next op of its rank) and ready
                if not all(per_rank[ops[j].rank][pos[ops[j].rank]] == j
                           if pos[ops[j].rank] < len(per_rank[ops[j].rank]) else False
                           for j in group):
                    break
                times = [ready(j) for j in group]
                if any(x is None for x in times):
                    break
                t = max(times)  # type: ignore[type-var]
                for j in group:
                    start[j], end[j] = t, t + ops[j].duration
                    free[ops[j].rank] = end[j]
                    pos[ops[j].rank] += 1
                    remaining -= 1
                moved = True
        if not moved:
            stuck = [ops[per_rank[r][pos[r]]].label for r in range(world) if pos[r] < len(per_rank[r])]
            raise ValueError(f"the plan cannot be simulated: ranks wait forever at {stuck}")
    spans = [Span(op.rank, op.kind, op.label, start[i], end[i], op.args) for i, op in enumerate(ops)]
    return Timeline(spans, world)


def pipeline_ops(s: Schedule, *, compute: Callable[[Action], float],
                 transfer: Callable[[Message], float], tail: Callable[[int], float] | None = None,
                 metric: float = 0.0, lines: Sequence[Sequence[int]] | None = None,
                 before: Callable[[int, Action], list[Op]] | None = None,
                 after: Callable[[int, Action], list[Op]] | None = None,
                 pre_tail: Callable[[int], list[Op]] | None = None,
                 compute_on: Callable[[int, Action], float] | None = None,
                 head: Callable[[int], list[Op]] | None = None) -> list[Op]:
    """The ops of one pipeline step: every rank's actions in its order, each waiting for what
    it needs (the producing action's end, plus `transfer` when the stages are on different
    ranks; B/I also wait for their F, W for its I), then per rank the update (`tail(rank)`)
    and the J all-reduce (`metric`, a collective of every rank).

    A hybrid mesh runs one such pipeline per (dp, tp) coordinate: `lines` lists each
    pipeline's global ranks (index = schedule rank; default one pipeline on ranks
    0..world−1); `before(rank, action)` gives the comm ops the action makes before its
    compute, once its input is there (a dp-sharded stage's weight gathers: the action
    starts with the first, which waits for what the action needs); `after(rank, action)`
    the comm ops it makes once its compute is done (a tensor-sharded stage's tp
    collectives, a dp-sharded one's gradient reduce-scatters: the action ends, for whoever
    needs its output, with its last one); `pre_tail(rank)` the ops before the update (the dp gradient
    all-reduce); `compute_on(rank, action)`, where given, the action's duration on that
    global rank (else `compute(action)`); `head(rank)` the ops a rank runs before its
    first action (`inputs_ops`: reading its rows of the batch)."""
    lines = [tuple(range(s.world))] if lines is None else [tuple(l) for l in lines]

    def extra(r: int, a: Action) -> list[Op]:
        return after(r, a) if after is not None else []

    def first(r: int, a: Action) -> list[Op]:
        return before(r, a) if before is not None else []

    def before_tail(r: int) -> list[Op]:
        return pre_tail(r) if pre_tail is not None else []

    def start(r: int) -> list[Op]:
        return head(r) if head is not None else []

    # Lay the ops out rank by rank first, so that every action's last op is known.
    last: dict[tuple[int, int, str, int], int] = {}  # (line, stage, kind, mb) -> its last op
    made: dict[tuple[int, Action], list[Op]] = {}
    lead: dict[tuple[int, Action], list[Op]] = {}
    at = 0
    for n, line in enumerate(lines):
        for p, r in enumerate(line):
            at += len(start(r))
            for a in s.ranks[p]:
                lead[(r, a)], made[(r, a)] = first(r, a), extra(r, a)
                at += len(lead[(r, a)]) + 1 + len(made[(r, a)])
                last[(n, a.stage, a.kind, a.mb)] = at - 1
            at += len(before_tail(r)) + (2 if tail is not None else 1)

    def producer(n: int, msg: Message) -> int:
        kinds = "F" if msg.role == "activation" else "BI"
        return next(last[(n, msg.from_stage, k, msg.mb)] for k in kinds
                    if (n, msg.from_stage, k, msg.mb) in last)

    ops: list[Op] = []
    for n, line in enumerate(lines):
        for p, r in enumerate(line):
            ops += start(r)
            for a in s.ranks[p]:
                deps: list[tuple[int, float]] = []
                msg = needs(a, s.stages)
                if msg is not None:
                    remote = s.stage_rank[msg.from_stage] != s.stage_rank[msg.to_stage]
                    deps.append((producer(n, msg), transfer(msg) if remote else 0.0))
                if a.kind in ("B", "I"):
                    deps.append((last[(n, a.stage, "F", a.mb)], 0.0))
                if a.kind == "W":
                    deps.append((last[(n, a.stage, "I", a.mb)], 0.0))
                took = compute_on(r, a) if compute_on is not None else compute(a)
                # the action's first op waits for its input (the runner receives, then
                # gathers, then computes)
                pre = lead[(r, a)]
                if pre:
                    pre = [replace(pre[0], deps=pre[0].deps + tuple(deps)), *pre[1:]]
                    deps = []
                ops += pre
                ops.append(Op(r, "compute", str(a), took, tuple(deps),
                              args={"stage": a.stage, "kind": a.kind, "mb": a.mb}))
                ops += made[(r, a)]
            ops += before_tail(r)
            if tail is not None:
                ops.append(Op(r, "compute", "update", tail(r), args={"kind": "update"}))
            ops.append(Op(r, "comm", "all_reduce metric", metric, sync="metric",
                          args={"role": "metric"}))
    return ops


UNIT = {"F": 1.0, "I": 1.0, "W": 1.0, "B": 2.0}  # equal F, I, W; B = I then W


def ideal_idle(s: Schedule) -> list[float]:
    """Per rank, the idle fraction of schedule `s` with equal stages, unit F = I = W (B = 2)
    and free communication: what the papers' bubble formulas describe, for this exact list."""
    tl = simulate(pipeline_ops(s, compute=lambda a: UNIT[a.kind], transfer=lambda m: 0.0),
                  s.world)
    return [tl.idle_fraction(r) for r in range(s.world)]


# ---------------------------------------------------------------- every strategy's step


@dataclass(frozen=True)
class Links:
    """α + n/β per message: point to point by payload, collectives by ring wire bytes."""

    p2p_alpha: float
    p2p_beta: float
    coll_alpha: float
    coll_beta: float

    def p2p(self, nbytes: int) -> float:
        return self.p2p_alpha + nbytes / self.p2p_beta

    def collective(self, wire: int, group: int) -> float:
        return 0.0 if group <= 1 else self.coll_alpha + wire / self.coll_beta

    def free(self) -> Links:
        return Links(0.0, float("inf"), 0.0, float("inf"))


ITEM = {"float32": 4, "float64": 8}


def inputs_ops(rank: int, t: dict[str, float]) -> list[Op]:
    """Reading the rank's rows of the step's batch (`inputs`, timed at start-up: a gather of
    rows from the dataset, outside every compute span), before anything else it does."""
    return [Op(rank, "other", "inputs", t["inputs"], args={"kind": "inputs"})] if t.get(
        "inputs") else []


def step_ops(cfg, times: list[dict[str, float]], links: Links, *, schedule=None) -> list[Op]:  # noqa: ANN001
    """One training step of `cfg`'s strategy as ops, from each rank's `calibrate.action_times`.

    pipeline: the schedule's action lists; data: each micro-batch's F and B, the gradient
    all-reduce, the update; tensor: layer by layer with the plan's collectives in between;
    fsdp: layer by layer with its gathers and reduce-scatters (`fsdp_rank_ops`); hybrid:
    the pipeline of every (dp, tp) coordinate with its tp and dp collectives
    (`hybrid_ops`); single: F and B per micro-batch. Every multi-rank step ends with the
    J all-reduce."""
    from partition.plans.data import param_count
    from partition.plans.stages import plan_stages
    from partition.plans.tensor import plan_layers, tensor_calls
    from partition.plans.traffic import METRIC_BYTES, ring_wire_bytes

    name, P, M = cfg.strategy.name, cfg.ranks, cfg.train.microbatches
    # activations cross in the compute dtype (bf16: 2 bytes), gradients reduce in the master's
    item, B = ITEM[cfg.train.dtype], cfg.train.batch_size
    citem = 2 if cfg.train.precision == "bf16" else item
    recompute = cfg.train.recompute == "full"
    metric = links.collective(ring_wire_bytes("all_reduce", METRIC_BYTES, P), P)
    if name == "hybrid":
        return hybrid_ops(cfg, times, links, schedule=schedule, metric=metric)
    if name == "pipeline":
        plan = plan_stages(cfg.spec, schedule.stages, cfg.strategy.balance)

        def transfer(m: Message) -> float:
            return links.p2p(B // M * cfg.model.dims[plan[max(m.from_stage, m.to_stage)][0]] * citem)

        return pipeline_ops(schedule, compute=lambda a: times[schedule.stage_rank[a.stage]][
            f"s{a.stage}:{a.kind}"], transfer=transfer, tail=lambda r: times[r]["update"],
            metric=metric, head=lambda r: inputs_ops(r, times[r]))
    ops: list[Op] = []
    for r in range(P):
        t = times[r]
        ops += inputs_ops(r, t)
        if name in ("single", "data"):
            for m in range(M):
                ops.append(Op(r, "compute", f"F{m}", t["F"], args={"kind": "F", "mb": m}))
                ops.append(Op(r, "compute", f"B{m}", t["B"], args={"kind": "B", "mb": m}))
            if name == "data" and P > 1:
                n = param_count(cfg.spec) * item
                ops.append(Op(r, "comm", "all_reduce weight_grad",
                              links.collective(ring_wire_bytes("all_reduce", n, P), P),
                              sync="weight_grad", args={"role": "weight_grad"}))
        elif name == "tensor":
            shards = plan_layers(cfg.strategy.layout, cfg.model.dims, P, r)
            calls = tensor_calls(cfg.strategy.layout, cfg.model.dims, world=P, rank=r, batch=B,
                                 micro=M, itemsize=citem, recompute=recompute)[:-1]
            at = 0

            def comm(m: int) -> None:
                nonlocal at
                c = calls[at]
                ops.append(Op(r, "comm", f"{c.op} {c.role}", links.collective(c.wire, P),
                              sync=f"{m}:{at}", args={"role": c.role}))
                at += 1

            for m in range(M):
                for s in shards:
                    ops.append(Op(r, "compute", f"F{s.layer}", t[f"F{s.layer}"],
                                  args={"kind": "F", "layer": s.layer, "mb": m}))
                    if P > 1 and (s.kind == "row" or s.kind == "rowwise"):
                        comm(m)
                ops.append(Op(r, "compute", "loss", t["loss"], args={"kind": "loss", "mb": m}))
                # recompute: the redone forward's hidden-layer collectives cross again (their
                # compute is in the calibrated B times)
                for s in shards if recompute and P > 1 else ():
                    if s.layer < cfg.spec.num_layers - 1 and s.kind in ("row", "rowwise"):
                        comm(m)
                for i in range(len(shards) - 1, -1, -1):
                    s = shards[i]
                    ops.append(Op(r, "compute", f"B{s.layer}", t[f"B{s.layer}"],
                                  args={"kind": "B", "layer": s.layer, "mb": m}))
                    if P > 1 and i > 0 and s.kind in ("column", "rowwise") and not (
                            s.kind == "column" and s.layer == 0):
                        comm(m)
        elif name == "fsdp":
            ops += fsdp_rank_ops(cfg, r, t, links)
        else:
            raise ValueError(f"no simulation for strategy {name!r}")
        if name != "fsdp":  # fsdp's update sits among its collectives (fsdp_rank_ops)
            ops.append(Op(r, "compute", "update", t["update"], args={"kind": "update"}))
        if P > 1:
            ops.append(Op(r, "comm", "all_reduce metric", metric, sync="metric",
                          args={"role": "metric"}))
    return ops


def _comm_op(rank: int, call: Any, seconds: float, sync: str) -> Op:  # a plans.traffic.Call
    return Op(rank, "comm", f"{call.op} {call.role}", seconds, sync=sync, args={"role": call.role})


def hybrid_ops(cfg, times: list[dict[str, float]], links: Links, *, schedule=None,  # noqa: ANN001
               metric: float) -> list[Op]:
    """A dp × pp × tp mesh's step (plans/mesh.py): per (dp, tp) coordinate the pipeline of
    its pp group — the schedule over mesh.pp, each action's compute from its rank's
    `action_times` (without its tp or dp collectives), the transfers between stages as
    point-to-point messages of one micro-batch of the replica's rows — where every action
    of a tensor-sharded stage is followed by its tp collectives (`stage_tp_calls`: the
    forward's after F, the backward's after B or I), each synchronised across the tp
    group; then the dp gradient all-reduce synchronised across the dp group, the update,
    and J over every rank.

    dp_shard (`stage_dp_calls`, each synchronised across the dp group): an F starts with
    its stage's forward weight gathers, a B or I with its backward ones (none with
    reshard_after_forward=false: the forward's are held), and a B or W ends with its
    gradient reduce-scatters; no all-reduce before the update.

    The action's compute is one op, its collectives before or after it: where a stage's
    layers make several collectives, their order against the compute is not kept, but
    every rank of the group waits the same, so the action's end (when its output is
    handed on) is the same."""
    from partition.plans.mesh import (
        hybrid_calls,
        replica_rows,
        resolve_mesh,
        stage_dp_calls,
        stage_shards,
        stage_tp_calls,
    )
    from partition.plans.schedule import load_schedule
    from partition.plans.stages import plan_stages

    st = cfg.strategy
    mesh = resolve_mesh(world=cfg.world_size, dp=st.dp, pp=st.pp, tp=st.tp)
    M, dims = cfg.train.microbatches, cfg.model.dims
    item = ITEM[cfg.train.dtype]
    citem = 2 if cfg.train.precision == "bf16" else item
    sched = schedule or load_schedule(st.schedule, world=mesh.pp, micro=M,
                                      virtual=st.virtual_stages)
    plan = plan_stages(cfg.spec, sched.stages, st.balance)
    lo, hi = replica_rows(cfg.train.batch_size, mesh, 0)  # every replica has as many rows
    mb = (hi - lo) // M

    def transfer(m: Message) -> float:
        return links.p2p(mb * dims[plan[max(m.from_stage, m.to_stage)][0]] * citem)

    tp_calls: dict[tuple[int, int], list] = {}  # (tp coordinate, stage) -> one micro-batch's
    dp_calls: dict[tuple[int, int], list] = {}  # the same, dp_shard's (gradients: master dtype)

    def stage_calls(r: int, a: Action) -> tuple[list, list]:
        c = mesh.coords(r)
        key = (c.tp, a.stage)
        if key not in tp_calls:
            start, end = plan[a.stage]
            tp_calls[key] = stage_tp_calls(st.layout, dims, start, end, tp=mesh.tp, rank=c.tp,
                                           rows=mb, itemsize=citem)
            shards = stage_shards(st.layout, dims, start, end, tp=mesh.tp, rank=c.tp)
            dp_calls[key] = stage_dp_calls(cfg.spec, shards, dp=mesh.dp, itemsize=item,
                                           reshard_after_forward=st.reshard_after_forward
                                           ) if st.dp_shard else []
        return tp_calls[key], dp_calls[key]

    def comm_ops(r: int, a: Action, dim: str, calls: list, pick) -> list[Op]:  # noqa: ANN001
        group = mesh.group(r, dim)
        return [_comm_op(r, call, links.collective(call.wire, mesh.size(dim)),
                         f"{dim}{group}:{a}:{k}") for k, call in enumerate(calls) if pick(call)]

    def before(r: int, a: Action) -> list[Op]:
        if a.kind == "W":  # the weight gradient needs no weights
            return []
        phase = "forward" if a.kind == "F" else "backward"
        return comm_ops(r, a, "dp", stage_calls(r, a)[1],
                        lambda c: c.role == "weight_gather" and c.phase == phase)

    def after(r: int, a: Action) -> list[Op]:
        tp, dp = stage_calls(r, a)
        phase = "forward" if a.kind == "F" else "backward"
        out = [] if a.kind == "W" else comm_ops(r, a, "tp", tp, lambda c: c.phase == phase)
        if a.kind in ("B", "W"):  # the weight gradient is complete
            out += comm_ops(r, a, "dp", dp, lambda c: c.role == "weight_grad")
        return out

    def pre_tail(r: int) -> list[Op]:
        calls = hybrid_calls(cfg.spec, mesh, sched, plan, layout=st.layout, rank=r,
                             batch=cfg.train.batch_size, micro=M, itemsize=item,
                             dp_shard=st.dp_shard,
                             reshard_after_forward=st.reshard_after_forward)["dp"]
        group = mesh.group(r, "dp")
        return [_comm_op(r, call, links.collective(call.wire, mesh.dp), f"dp{group}:{k}")
                for k, call in enumerate(calls) if call.phase == "update"]

    lines = [tuple(mesh.rank_of(dp=d, pp=p, tp=t) for p in range(mesh.pp))
             for d in range(mesh.dp) for t in range(mesh.tp)]
    return pipeline_ops(sched, compute=lambda a: 0.0, transfer=transfer,
                        tail=lambda r: times[r]["update"], metric=metric, lines=lines,
                        before=before, after=after, pre_tail=pre_tail,
                        compute_on=lambda r, a: times[r][f"s{a.stage}:{a.kind}"],
                        head=lambda r: inputs_ops(r, times[r]))


def fsdp_rank_ops(cfg, rank: int, t: dict[str, float], links: Links) -> list[Op]:  # noqa: ANN001
    """One fsdp rank's step before J (plans/fsdp.py): per micro-batch each layer's F, the
    loss, each layer's B from the top; the plan's collectives where the runner makes them
    (stage 3: a layer's weight gather before its F and, resharded, before its B; stages 2
    and 3: its gradient's reduce-scatter after its B; stage 1: the gradient all-reduce
    before the update; stages 1 and 2: every layer's gather after it). Every rank makes
    the same calls in the same order: the call's place in the plan's list is its key."""
    from collections import deque

    from partition.plans.fsdp import fsdp_calls, shard_plan

    st, P, L = cfg.strategy, cfg.ranks, cfg.spec.num_layers
    shards = shard_plan(cfg.model.dims, world=P, bias=cfg.model.bias)
    calls = deque(enumerate(fsdp_calls(shards, zero_stage=st.zero_stage,
                                       reshard_after_forward=st.reshard_after_forward,
                                       micro=cfg.train.microbatches,
                                       itemsize=ITEM[cfg.train.dtype])))
    ops: list[Op] = []

    def take(role: str, phase: str, layer: int | None) -> None:
        """The plan's next calls, while they are this role's for this phase and layer."""
        while calls and (calls[0][1].role, calls[0][1].phase, calls[0][1].layer) == (
                role, phase, layer):
            k, call = calls.popleft()
            ops.append(_comm_op(rank, call, links.collective(call.wire, P), f"fsdp:{k}"))

    for m in range(cfg.train.microbatches):
        for l in range(L):
            take("weight_gather", "forward", l)
            ops.append(Op(rank, "compute", f"F{l}", t[f"F{l}"],
                          args={"kind": "F", "layer": l, "mb": m}))
        ops.append(Op(rank, "compute", "loss", t["loss"], args={"kind": "loss", "mb": m}))
        for l in range(L - 1, -1, -1):
            take("weight_gather", "backward", l)
            ops.append(Op(rank, "compute", f"B{l}", t[f"B{l}"],
                          args={"kind": "B", "layer": l, "mb": m}))
            take("weight_grad", "backward", l)
    take("weight_grad", "update", None)
    ops.append(Op(rank, "compute", "update", t["update"], args={"kind": "update"}))
    for l in range(L):
        take("weight_gather", "update", l)
    if calls:  # the plan has a call the runner's order above does not place
        raise ValueError(f"fsdp simulation: the plan's call {calls[0][1]} has no place")
    return ops

