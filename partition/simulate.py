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
    time_key        which of those times an op (or a measured span) is
    as_measured     the ops with the durations a run's own steps measured (collectives, the
                    runtime's time between actions)
    hybrid_ops      a dp × pp × tp mesh's step; fsdp_rank_ops one fsdp rank's
    simulate        the timeline of any ops

Idle fraction of a rank = 1 − (its compute inside the step) / (its own step: from its start
to its last op's end), the same definition the measured timeline uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from partition.plans.schedule import Action, Message, Schedule, comm_program, eager_sends, needs


START = "start"  # the key of a step's start: "after:start" is the runtime before its first op


def time_key(args: dict[str, Any]) -> str | None:
    """The `calibrate.action_times` key an op is timed by, read off its args (kind, and
    stage or layer); a measured span with the same args (the runners name theirs alike)
    maps to the same key, which is how a run's own steps time the simulator's ops."""
    kind = args.get("kind")
    if kind in ("loss", "update", "inputs"):
        return kind
    if kind not in ("F", "B", "I", "W"):
        return None
    if "stage" in args:
        return f"s{args['stage']}:{kind}"
    return f"{kind}{args['layer']}" if "layer" in args else kind


def transfer_key(sender: int, receiver: int, seq: int) -> str:
    """The key of one message's measured transfer: the `seq`-th message the sender posted to
    the receiver in the step (global ranks; comm.py numbers them so)."""
    return f"xfer:{sender}>{receiver}#{seq}"


def sent_key(sender: int, receiver: int, seq: int) -> str:
    """The key of when one message's send completed, measured from when it could move (its
    isend made and its receive posted): gloo completes a send once its data is taken, which
    may be well before the receiver sees it (and after: a receiver that is late to look)."""
    return f"sent:{sender}>{receiver}#{seq}"


def piece_key(event: str, peer: int, seq: int) -> str:
    """The key of one message call of a rank (`event`: send — its isend; post — its receive
    posted; wsend — its send waited for; wrecv — its receive waited for) with `peer` (global
    rank) and the message's `seq` (comm.py numbers a rank's sends to and receives from a
    peer so): a measured step's "lead:<key>", the rank's own time between the previous
    call or action and this call, and "call:<key>", the isend's or irecv's own time, put
    the call where the step made it (`as_measured`)."""
    return f"{event}:{peer}#{seq}"


PIECE_PREFIXES = ("lead:", "call:")  # a message call's measured pieces (`piece_key`)


def op_keys(args: dict[str, Any]) -> tuple[str, ...]:
    """The keys a measured step times an op (or a span with the same args) by: its
    `time_key`, and with a micro-batch that key "@<mb>" too — the one occurrence, so that
    a replay puts what one action took (a stall, a slow start) where it happened."""
    key = time_key(args)
    if key is None:
        return ()
    mb = args.get("mb")
    return (key, f"{key}@{mb}") if isinstance(mb, int) and mb >= 0 else (key,)


def key_uses(ops: Sequence[Op], world: int) -> list[dict[str, int]]:
    """Per rank, how many of its ops each action key (`op_keys`) times in one step."""
    out: list[dict[str, int]] = [{} for _ in range(world)]
    for op in ops:
        for key in op_keys(op.args) if op.kind != "comm" else ():
            out[op.rank][key] = out[op.rank].get(key, 0) + 1
    return out


@dataclass(frozen=True)
class Op:
    """One thing a rank does: compute, or its part of a communication."""

    rank: int
    kind: str  # compute | comm | other (reading the batch) | runtime | post | transfer
    label: str  # e.g. "0F1", "update", "all_reduce metric"
    duration: float
    deps: tuple[tuple[int, float], ...] = ()  # (index of an op in the flat list, lag)
    sync: str | None = None  # a collective: ops with the same key start together
    args: dict = field(default_factory=dict, compare=False, hash=False)
    # where it runs, one op at a time in list order: its rank (None), or a link's name (a
    # message's transfer: one connection carries one message at a time, in send order)
    stream: tuple | None = None


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

    @cached_property
    def _began(self) -> dict[int, float]:
        return {s.rank: s.end for s in self.spans if s.kind == "late"}

    @cached_property
    def _ended(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for s in self.spans:
            if s.kind != "transfer":  # a message's transfer runs on its link, not its receiver
                out[s.rank] = max(out.get(s.rank, 0.0), s.end)
        return out

    def rank_step(self, rank: int) -> float:
        """The rank's own step: from its start (after a late start, where replayed) to its
        own last op's end, as a rank's measured step runs from its own start to its own
        end (members may leave the step's last collective at different times)."""
        return self._ended.get(rank, self.step_time) - self._began.get(rank, 0.0)

    def idle_fraction(self, rank: int) -> float:
        t = self.rank_step(rank)
        return 1.0 - self.compute(rank) / t if t > 0 else 0.0

    def rank_spans(self, rank: int) -> list[Span]:
        """What the rank itself does: not a message's transfer (its link's), nor the marks
        of its message calls (no time of their own; a wait's spans the time it waited)."""
        return [s for s in self.spans if s.rank == rank and s.kind not in ("transfer", "post")]


def as_measured(ops: list[Op], times: list[dict[str, float]]) -> list[Op]:
    """`ops` with what the run's own steps measured, where its times have it: a collective
    lasts its "coll:<label>" seconds (instead of α + wire/β), a message's transfer its
    own or its role's "xfer:" seconds (instead of α + n/β) — the receiver's view — and
    a send is waited for until its measured completion ("sent:", `sent_key`: from when
    its message could move; else until the message arrived); each message call of the
    rank's program (a marker op with a "piece", `piece_key`) comes after its "lead:"
    seconds and is followed by its "call:" seconds (the isend's or irecv's own time), and
    the rest of the runtime's time after an action ("after:<key>": what it spent after its
    last message call, Python, the next action's set-up) comes just before the rank's next
    op of its own ("after:start" before its first), each in an op of kind "runtime"
    (neither compute nor a wait); a rank that began the step "late:start" seconds after
    another begins it with an op of kind "late". Ops marked "inside" (the collectives an
    action makes, `pipeline_ops`' `after`) belong to their action: the runtime after it
    follows them. Dependencies are re-pointed to the ops' new places."""
    where: list[int] = []
    out: list[Op] = []
    begun: set[int] = set()
    pending: dict[int, Op] = {}  # per rank, its runtime after its last action, not yet laid out

    def runtime(rank: int, label: str, seconds: float, after: str) -> Op:
        return Op(rank, "runtime", label, seconds, args={"after": after})

    for op in ops:
        t = times[op.rank]
        piece = op.args.get("piece") if op.kind == "post" else None
        if op.stream is None and op.rank not in begun:  # the runtime before the first action
            begun.add(op.rank)
            if t.get(f"late:{START}", 0.0) > 0:  # the rank began the step after another
                out.append(Op(op.rank, "late", "late start", t[f"late:{START}"]))
            if t.get(f"after:{START}", 0.0) > 0:
                out.append(runtime(op.rank, f"after {START}", t[f"after:{START}"], START))
        if (op.stream is None and piece is None and not op.args.get("inside")
                and op.rank in pending):
            out.append(pending.pop(op.rank))
        if piece is not None and piece.startswith("wsend:") and op.deps:
            done = t.get(sent_key(op.rank, op.args["peer"], op.args["seq"]))
            if done is not None:  # the send completed this long after it could move
                (xfer, _), = op.deps
                op = replace(op, deps=tuple((d, done) for d, _ in ops[xfer].deps))
        if op.kind == "comm" and op.sync is not None and f"coll:{op.label}" in t:
            op = replace(op, duration=t[f"coll:{op.label}"])
        elif op.kind == "transfer":
            own = transfer_key(op.args["from"], op.rank, op.args["seq"])
            took = t.get(own, t.get(f"xfer:{op.args['role']}"))
            if took is not None:  # this very message as the step moved it, else its role's
                op = replace(op, duration=took)
        if piece is not None and t.get(f"lead:{piece}", 0.0) > 0:
            out.append(runtime(op.rank, f"before {op.label}", t[f"lead:{piece}"], piece))
        keys = op_keys(op.args) if op.kind not in ("comm", "transfer", "post") else ()
        own = next((k for k in reversed(keys) if k in t and "@" in k), None)
        if own is not None:  # this very action as the step took it
            op = replace(op, duration=t[own])
        where.append(len(out))
        out.append(op)
        if piece is not None and t.get(f"call:{piece}", 0.0) > 0:
            out.append(runtime(op.rank, op.label, t[f"call:{piece}"], piece))
        after = next((f"after:{k}" for k in reversed(keys) if f"after:{k}" in t), None)
        if after is not None and t[after] > 0:
            pending[op.rank] = runtime(op.rank, f"after {op.label}", t[after],
                                       after.removeprefix("after:"))
    out += [pending[r] for r in sorted(pending)]  # after a rank's last op
    return [replace(o, deps=tuple((where[j], lag) for j, lag in o.deps)) if o.deps else o
            for o in out]


def simulate(ops: list[Op], world: int) -> Timeline:
    """Play the ops: each stream (a rank, a link) in its own order, deps and collectives
    honoured."""
    streams: dict[Any, list[int]] = {r: [] for r in range(world)}
    for i, op in enumerate(ops):
        streams.setdefault(op.rank if op.stream is None else op.stream, []).append(i)
    keys = list(streams)
    where = {i: k for k in keys for i in streams[k]}
    members: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        if op.sync is not None:
            members.setdefault(op.sync, []).append(i)
    end: dict[int, float] = {}
    start: dict[int, float] = {}
    free = dict.fromkeys(keys, 0.0)
    pos = dict.fromkeys(keys, 0)

    def ready(i: int) -> float | None:
        t = free[where[i]]
        for d, lag in ops[i].deps:
            if d not in end:
                return None
            t = max(t, end[d] + lag)
        return t

    def at_turn(j: int) -> bool:
        k = where[j]
        return pos[k] < len(streams[k]) and streams[k][pos[k]] == j

    remaining = len(ops)
    while remaining:
        moved = False
        for k in keys:
            queue = streams[k]
            while pos[k] < len(queue):
                i = queue[pos[k]]
                op = ops[i]
                if op.sync is None:
                    t = ready(i)
                    if t is None:
                        break
                    # a wait (a marker of the program: a send or receive waited for) spans
                    # the time its rank stood waiting, to be drawn as the measured waits are
                    start[i], end[i] = (free[k] if op.kind == "post" else t), t + op.duration
                    free[k] = end[i]
                    pos[k] += 1
                    remaining -= 1
                    moved = True
                    continue
                group = members[op.sync]
                # every member must be at its turn (the next op of its stream) and ready
                if not all(at_turn(j) for j in group):
                    break
                times = [ready(j) for j in group]
                if any(x is None for x in times):
                    break
                t = max(times)  # type: ignore[type-var]
                for j in group:
                    start[j], end[j] = t, t + ops[j].duration
                    free[where[j]] = end[j]
                    pos[where[j]] += 1
                    remaining -= 1
                moved = True
        if not moved:
            stuck = [ops[streams[k][pos[k]]].label for k in keys if pos[k] < len(streams[k])]
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
                 head: Callable[[int], list[Op]] | None = None,
                 rendezvous: bool = False) -> list[Op]:
    """The ops of one pipeline step: every rank's program (`plans.schedule.comm_program`,
    the runtime's own order of actions, posted receives, sends and waits), each action
    waiting for what it needs (B/I also for their F, W for its I), then per rank the update
    (`tail(rank)`) and the J all-reduce (`metric`, a collective of every rank).

    A message between stages on different ranks is a transfer op (`transfer(message)`
    seconds) on its link, the connection between the two ranks, which carries one message
    at a time in send order; it starts when its action has ended and, with `rendezvous`,
    once its isend is made and its receive posted (gloo and NCCL move a message only into
    a posted receive, and a send completes only then: a sender that waits for its send
    waits for that — here until the message has arrived, `as_measured` until the send's
    measured completion). Each message call is then a marker op of its rank's program
    (kind "post", a "piece" in its args, `piece_key`). Without `rendezvous` a message
    moves as soon as it is made.

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
    programs = [comm_program(s, p, eager=eager_sends(s)) for p in range(s.world)]
    ops: list[Op] = []
    wants: list[list[tuple[tuple, float]]] = []  # per op, its deps by name (resolved below)
    named: dict[tuple, int] = {}
    sent: dict[tuple[int, int], int] = {}  # (sender, receiver) -> messages so far
    got: dict[tuple[int, int], int] = {}  # (receiver, sender) -> receives posted so far
    seqs: dict[tuple[str, int, Message], int] = {}  # ("send"|"recv", line, message) -> its seq

    def emit(op: Op, deps: Sequence[tuple[tuple, float]] = (), name: tuple | None = None) -> None:
        if name is not None:
            named[name] = len(ops)
        ops.append(op)
        wants.append(list(deps))

    def producer(n: int, msg: Message) -> tuple:
        kinds = "F" if msg.role == "activation" else "BI"
        return next((("act", n, Action(msg.from_stage, k, msg.mb)) for k in kinds
                     if ("act", n, Action(msg.from_stage, k, msg.mb)) in named),
                    ("act", n, Action(msg.from_stage, kinds[0], msg.mb)))

    def marker(r: int, event: str, peer: int, seq: int, label: str) -> Op:
        """A message call of rank r's program: no time of its own (`as_measured` puts the
        call's measured pieces around it)."""
        return Op(r, "post", label, 0.0,
                  args={"piece": piece_key(event, peer, seq), "peer": peer, "seq": seq})

    for n, line in enumerate(lines):
        for p, r in enumerate(line):
            for op in head(r) if head is not None else []:
                emit(op)
            for what, x in programs[p]:
                if what == "post_recv":
                    if rendezvous:  # the receive is there from now on: the message may move
                        frm = line[s.stage_rank[x.from_stage]]
                        seq = seqs["recv", n, x] = got.get((r, frm), 0)
                        got[(r, frm)] = seq + 1
                        emit(marker(r, "post", frm, seq, f"post recv {x.role}"), name=("post", n, x))
                elif what == "isend":  # the message moves on its link, in send order
                    to = line[s.stage_rank[x.to_stage]]
                    seq = seqs["send", n, x] = sent.get((r, to), 0)  # as comm.py numbers them
                    sent[(r, to)] = seq + 1
                    if rendezvous:  # it may move once the isend is made and its receive posted
                        emit(marker(r, "send", to, seq, f"send {x.role}"), [(("act", n, last), 0.0)],
                             name=("send", n, x))
                        deps = [(("send", n, x), 0.0), (("post", n, x), 0.0)]
                    else:
                        deps = [(("act", n, last), 0.0)]
                    emit(Op(to, "transfer", f"{x.role} {x.from_stage}>{x.to_stage} mb {x.mb}",
                            transfer(x), args={"role": x.role, "from": r, "seq": seq},
                            stream=("link", n, p, s.stage_rank[x.to_stage])),
                         deps, name=("xfer", n, x))
                elif what == "wait_send":
                    if rendezvous:  # a send completes once its message has arrived (as_measured:
                        # once the step saw it complete)
                        emit(marker(r, "wsend", line[s.stage_rank[x.to_stage]], seqs["send", n, x],
                                    f"wait send {x.role}"), [(("xfer", n, x), 0.0)])
                elif what == "wait_recv":
                    if rendezvous:  # the action waits for its input (below) here
                        emit(marker(r, "wrecv", line[s.stage_rank[x.from_stage]],
                                    seqs["recv", n, x], f"wait recv {x.role}"),
                             [(("xfer", n, x), 0.0)])
                elif what == "compute":
                    a = last = x
                    deps: list[tuple[tuple, float]] = []
                    msg = needs(a, s.stages)
                    if msg is not None:
                        remote = s.stage_rank[msg.from_stage] != s.stage_rank[msg.to_stage]
                        deps.append((("xfer", n, msg) if remote else producer(n, msg), 0.0))
                    if a.kind in ("B", "I"):
                        deps.append((("act", n, Action(a.stage, "F", a.mb)), 0.0))
                    if a.kind == "W":
                        deps.append((("act", n, Action(a.stage, "I", a.mb)), 0.0))
                    took = compute_on(r, a) if compute_on is not None else compute(a)
                    # the action's first op waits for its input (the runner receives, then
                    # gathers, then computes)
                    pre = before(r, a) if before is not None else []
                    for j, op in enumerate(pre):
                        emit(op, deps if j == 0 else [])
                    emit(Op(r, "compute", str(a), took, (),
                            args={"stage": a.stage, "kind": a.kind, "mb": a.mb}),
                         [] if pre else deps)
                    for op in after(r, a) if after is not None else []:
                        emit(replace(op, args={**op.args, "inside": True}))  # part of the action
                    named[("act", n, a)] = len(ops) - 1  # what waits for the action waits for this
            for op in pre_tail(r) if pre_tail is not None else []:
                emit(op)
            if tail is not None:
                emit(Op(r, "compute", "update", tail(r), args={"kind": "update"}))
            emit(Op(r, "comm", "all_reduce metric", metric, sync="metric", args={"role": "metric"}))
    # deps by name -> by place: a transfer and a posted receive may be laid out after what
    # waits for them (another rank's ops come later in the list)
    out = []
    for op, deps in zip(ops, wants, strict=True):
        resolved = tuple((named[d], lag) for d, lag in deps)
        out.append(replace(op, deps=op.deps + resolved) if resolved else op)
    return out


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
    # a message moves only into a posted receive, and a send completes when it has arrived
    # (gloo, NCCL); free communication has no such wait either
    rendezvous: bool = True

    def p2p(self, nbytes: int) -> float:
        return self.p2p_alpha + nbytes / self.p2p_beta

    def collective(self, wire: int, group: int) -> float:
        return 0.0 if group <= 1 else self.coll_alpha + wire / self.coll_beta

    def free(self) -> Links:
        return Links(0.0, float("inf"), 0.0, float("inf"), rendezvous=False)


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
            metric=metric, head=lambda r: inputs_ops(r, times[r]), rendezvous=links.rendezvous)
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
                        head=lambda r: inputs_ops(r, times[r]), rendezvous=links.rendezvous)


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

