"""`pipeline` on `torch.distributed.pipelining`: a PipelineStage per stage, torch's schedules.

The stage plan is the explicit engine's: the schedule (plans/schedule.py, plans/generators.py)
says how many stages there are and which rank holds which (round robin for interleaved,
V for zbv/dualpipev), `plan_stages` which layers each holds. This rank builds one
nn.Sequential and one PipelineStage per stage it holds and hands them to torch's own
schedule class:

    gpipe, 1f1b         ScheduleGPipe, Schedule1F1B (one stage per rank)
    interleaved_1f1b    ScheduleInterleaved1F1B
    looped_bfs          ScheduleLoopedBFS
    zb1p                ScheduleInterleavedZeroBubble
    zbv                 ScheduleZBVZeroBubble
    dualpipev           ScheduleDualPipeV (its OVERLAP_F_B pairs run one after the other)
    FILE.csv            _PipelineScheduleRuntime reading the same compute-only CSV

torch generates its own order; the runner checks, before the first step, that it is the
order and layout of the explicit engine's plan (tests/test_generators.py compares the
two generators everywhere). Each stage is given its input and output shapes, so torch
runs in its STATIC mode and exchanges no shape metadata — only a 4-byte vote per
neighbour on the first step (role `metadata` here). The loss of a micro-batch is its sum
divided by the *full* batch size with `scale_grads=False`, so the M micro-batch gradients
add up to exactly the full-batch mean, as in the explicit engine.

Roles: with one stage per rank, p2p towards rank+1 (or from rank−1) of the boundary
activation's shape and dtype is `activation` (forward), towards rank−1
`activation_grad` (backward). With several, torch's lowered schedule
(`pipeline_order_with_comms`: SEND_F / RECV_F / SEND_B / RECV_B in the order the runtime
posts them, one p2p op each) names every p2p op this rank dispatches, in order. Any
other p2p is `metadata`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

from partition.comm import Comm
from partition.config import RunConfig
from partition.data import Dataset
from partition.engines.common import (
    TorchRunner,
    as_layer,
    build_linear,
    hits,
    layer_stack,
    loss_sum,
    make_sgd,
)
from partition.engines.observe import SeenOp
from partition.model import Layer
from partition.plans.schedule import Action, Schedule
from partition.plans.stages import plan_stages
from partition.strategies.pipeline import pipeline_schedule
from partition.topology import Topology

SINGLE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
MULTI = {"interleaved_1f1b": ScheduleInterleaved1F1B, "looped_bfs": ScheduleLoopedBFS,
         "zb1p": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble,
         "dualpipev": ScheduleDualPipeV}
_COMM_ROLE = {"SEND_F": ("send", "activation"), "RECV_F": ("recv", "activation"),
              "SEND_B": ("send", "activation_grad"), "RECV_B": ("recv", "activation_grad")}


def compute_order(pipeline_order: dict[int, list], rank: int) -> tuple[Action, ...]:
    """torch's `pipeline_order[rank]` as our actions: empty slots dropped, an OVERLAP_F_B
    written as its sub-actions in order (torch's runtime runs them one after the other)."""
    out = []
    for a in pipeline_order[rank]:
        if a is None:
            continue
        for s in a.sub_actions or (a,):
            out.append(Action(s.stage_index, s.computation_type.value, s.microbatch_index))
    return tuple(out)


class TorchPipelineRunner(TorchRunner):
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor], *, schedule: Schedule | None = None,
                 rows: tuple[int, int] | None = None, group: ProcessGroup | None = None) -> None:
        """`topo` is the pipeline's (the world, or a hybrid mesh's pp dimension, whose
        `group` the stages talk over); `rows`: the rows of each step's batch this pipeline
        takes (a data-parallel replica's), all of them by default."""
        super().__init__(cfg, topo, comm, data)
        P, rank = topo.world_size, topo.rank
        M = cfg.train.microbatches
        name = cfg.strategy.schedule
        if name == "1f1b" and M < P:
            raise ValueError(f"torch's Schedule1F1B needs train.microbatches >= world_size, "
                             f"got {M} < {P}")
        # the explicit engine's: layout and stage count
        plan_sched = schedule if schedule is not None else pipeline_schedule(cfg)
        S = plan_sched.stages
        self.plan = plan_stages(self.spec, S, cfg.strategy.balance)
        self.mine = plan_sched.rank_stages(rank)
        self.rows, self.group = rows or (0, self.B), group
        dev = topo.device
        mb = (self.rows[1] - self.rows[0]) // M
        self.modules, self.stages = [], []
        self.linears, self.layers = [], []
        self.shapes: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}
        for s in self.mine:
            start, end = self.plan[s]
            module, lins, layers = self._stage_module(start, end, full)
            self.shapes[s] = ((mb, self.spec.dims[start]), (mb, self.spec.dims[end]))
            # requires_grad on the examples tells torch which gradients cross back: the
            # boundary activations' (the first stage's input, the data, needs none).
            stage = PipelineStage(
                module, s, S, dev,
                input_args=torch.empty(self.shapes[s][0], dtype=self.dtype, device=dev,
                                       requires_grad=s > 0),
                output_args=torch.empty(self.shapes[s][1], dtype=self.dtype, device=dev,
                                        requires_grad=True),
                group=group)
            module.register_forward_hook(self._count_in_flight)
            self._mark_compute(stage)
            self.modules.append(module)
            self.stages.append(stage)
            self.linears += lins
            self.layers += layers
        self.opt = make_sgd(self.linears, cfg)
        self.first, self.last = 0 in self.mine, S - 1 in self.mine
        kw = {"n_microbatches": M, "loss_fn": self._loss, "scale_grads": False}
        if name in SINGLE:
            self.stage = self.stages[0]
            self.schedule = SINGLE[name](self.stage, **kw)
            self._comm_roles = None
        else:
            if name in MULTI:
                self.schedule = MULTI[name](self.stages, **kw)
            else:  # a compute-only CSV, lowered by torch's own runtime
                self.schedule = _PipelineScheduleRuntime(self.stages, **kw)
                self.schedule._load_csv(name)
            self._check_same_plan(plan_sched)
            self._comm_roles = [(_COMM_ROLE[a.computation_type.value], a.stage_index)
                                for a in self.schedule.pipeline_order_with_comms[rank]
                                if a.computation_type.value in _COMM_ROLE]
        self._p2p_seen = 0
        self._loss_sum, self._correct = 0.0, 0
        self._forward_mb = -1  # the last stage's latest forward: the micro-batch of its loss
        self._eval: tuple[PipelineStage, ScheduleGPipe] | None = None

    def _stage_module(self, start: int, end: int, full: dict[str, torch.Tensor],
                      ) -> tuple[nn.Module, list[nn.Linear], list[Layer]]:
        """Layers [start, end) as the module a PipelineStage runs, what the optimizer trains
        of them, and their Layer views (for weights.npz)."""
        lins = [build_linear(full, l, self.spec, dtype=self.dtype, device=self.topo.device)
                for l in range(start, end)]
        return (layer_stack(self.spec, lins, start), lins,
                [as_layer(start + k, lin) for k, lin in enumerate(lins)])

    def _check_same_plan(self, plan_sched) -> None:  # noqa: ANN001 - plans.schedule.Schedule
        """torch's layout and compute order are the explicit engine's (else the two engines
        would run different schedules under one name)."""
        layout = self.schedule.stage_index_to_group_rank
        if tuple(layout[s] for s in range(plan_sched.stages)) != plan_sched.stage_rank:
            raise ValueError(f"torch lays out {self.cfg.strategy.schedule} as {layout}, the plan "
                             f"as {plan_sched.stage_rank}")
        for r in range(plan_sched.world):
            theirs = compute_order(self.schedule.pipeline_order, r)
            if theirs != plan_sched.ranks[r]:
                raise ValueError(f"torch's {self.cfg.strategy.schedule} order on rank {r} is not "
                                 f"the plan's: {' '.join(map(str, theirs))}")

    def _mark_compute(self, stage: PipelineStage) -> None:
        """Open a profiler range around each compute call torch's schedule makes on `stage`,
        named as the explicit engine names the action (profiled.py says why torch's own
        ranges do not serve). Off — a plain call — on untraced steps."""
        s = stage.stage_index
        forward, backward = stage.forward_one_chunk, stage.backward_one_chunk
        weight = stage.backward_weight_one_chunk

        def mark(kind: str, mb: int):  # noqa: ANN202 - Marks' context manager
            return self.marks(str(Action(s, kind, mb)), stage=s, kind=kind, mb=mb)

        def forward_one_chunk(fwd_chunk_id: int, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self._forward_mb = fwd_chunk_id
            with mark("F", fwd_chunk_id):
                return forward(fwd_chunk_id, *args, **kwargs)

        def backward_one_chunk(bwd_chunk_id: int, loss=None, full_backward: bool = True,  # noqa: ANN001, ANN202
                               last_backward: bool = False):
            with mark("B" if full_backward else "I", bwd_chunk_id):
                return backward(bwd_chunk_id, loss=loss, full_backward=full_backward,
                                last_backward=last_backward)

        def backward_weight_one_chunk(bwd_chunk_id: int, last_backward: bool = False):  # noqa: ANN202
            with mark("W", bwd_chunk_id):
                return weight(bwd_chunk_id, last_backward=last_backward)

        stage.forward_one_chunk = forward_one_chunk
        stage.backward_one_chunk = backward_one_chunk
        stage.backward_weight_one_chunk = backward_weight_one_chunk

    def _count_in_flight(self, module, args, output) -> None:  # noqa: ANN001
        # Each stage caches this chunk right after the forward (fwd_cache) and keeps what a
        # deferred W needs (backward_state) until it runs: what is cached now is alive.
        held = sum(len(st.fwd_cache) + len(st.backward_state) for st in self.stages)
        self.in_flight = max(self.in_flight, held + 1)

    def _loss(self, o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One micro-batch's share of its rows' mean (the full batch's, or a data-parallel
        replica's, which DDP then averages); also counts its loss sum and hits. torch calls
        it right after the last stage's forward of that micro-batch."""
        mb, last = self._forward_mb, len(self.plan) - 1
        with self.marks(f"loss{mb}", stage=last, kind="loss", mb=mb):
            total = loss_sum(self.spec, o, y)
            self._loss_sum += float(total.detach())
            self._correct += hits(self.spec, o, y)
            return total / (self.rows[1] - self.rows[0])

    def _train(self, X: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        self._loss_sum, self._correct, self.in_flight = 0.0, 0, 0
        self._p2p_seen = 0
        X, y = X[slice(*self.rows)], y[slice(*self.rows)]
        args = (X,) if self.first else ()
        self.schedule.step(*args, target=y if self.last else None, return_outputs=False)
        # The loss lives on the last stage; the others contribute 0 to the reduction.
        return self._loss_sum, self._correct

    def role_of(self, s: SeenOp) -> tuple[str, str]:
        if s.op not in ("send", "recv") or s.dtype != self.dtype:
            return "metadata", "forward" if s.op in ("send", "recv") else s.phase
        if self._comm_roles is None:
            return self._single_stage_role(s)
        return self._lowered_role(s)

    def _single_stage_role(self, s: SeenOp) -> tuple[str, str]:
        me = self.topo.rank
        downstream = s.peer == me + 1
        inp, out = self.shapes[self.mine[0]]
        if s.shape == (out if downstream else inp):
            forward = downstream == (s.op == "send")
            return ("activation", "forward") if forward else ("activation_grad", "backward")
        return "metadata", "forward"

    def _lowered_role(self, s: SeenOp) -> tuple[str, str]:
        """The next SEND/RECV of torch's lowered schedule, if this op is it (same op, peer
        and shape); anything else (the first step's vote) is metadata."""
        roles = self._comm_roles
        k = self._p2p_seen % len(roles) if roles else 0
        if roles:
            (op, role), stage = roles[k]
            peer_stage = stage - 1 if (op == "recv") == (role == "activation") else stage + 1
            inp, out = self.shapes[stage]
            shape = inp if peer_stage < stage else out
            peer = self.schedule.stage_index_to_group_rank[peer_stage]
            if (s.op, s.peer, s.shape) == (op, peer, shape):
                self._p2p_seen += 1
                return role, "forward" if role == "activation" else "backward"
        return "metadata", "forward"

    def predict(self, step: int) -> torch.Tensor | None:
        """Forward only, the whole batch as one micro-batch, through torch's own eval path
        (one stage per rank); with several, stage after stage on torch's modules."""
        if len(self.stages) > 1:
            return self._predict_stages(step)
        if self._eval is None:
            P, i, dev = self.topo.world_size, self.topo.rank, self.topo.device
            start, end = self.plan[i]

            def example(width: int) -> torch.Tensor:
                return torch.empty((self.rows[1] - self.rows[0], width), dtype=self.dtype,
                                   device=dev)

            stage = PipelineStage(self.modules[0], i, P, dev,
                                  input_args=example(self.spec.dims[start]),
                                  output_args=example(self.spec.dims[end]), group=self.group)
            self._eval = (stage, ScheduleGPipe(stage, n_microbatches=1))
        _, sched = self._eval
        X = self._batch(step)[0][slice(*self.rows)]
        with torch.no_grad():
            out = sched.eval(X) if self.first else sched.eval()
        return out if self.last else None

    def _predict_stages(self, step: int) -> torch.Tensor | None:
        """Several stages per rank: the full-batch forward through every stage in order,
        the activation crossing between ranks with plain send/recv (torch's multi-stage
        schedules have no eval path for a single micro-batch of the whole batch)."""
        import torch.distributed as dist

        X = self._batch(step)[0][slice(*self.rows)]
        layout = self.schedule.stage_index_to_group_rank  # ranks in the pipeline's group
        S, me, x = len(self.plan), self.topo.rank, None
        with torch.no_grad():
            for s in range(S):
                holder = layout[s]
                if holder == me:
                    if s == 0:
                        x = X
                    elif layout[s - 1] != me:
                        x = torch.empty((len(X), self.spec.dims[self.plan[s][0]]),
                                        dtype=self.dtype, device=self.topo.device)
                        dist.recv(x, group=self.group, group_src=layout[s - 1])
                    x = self.modules[self.mine.index(s)](x)
                    if s + 1 < S and layout[s + 1] != me:
                        dist.send(x.contiguous(), group=self.group, group_dst=layout[s + 1])
        return x if self.last else None
