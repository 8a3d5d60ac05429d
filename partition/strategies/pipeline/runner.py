"""The pipeline runtime: one rank executes its action list, whatever the schedule.

The schedule (plans/schedule.py) is the only place an order of work is written. This
runtime walks the rank's list of F / B / I / W actions and derives every crossing from
them: F of stage s hands its output to stage s+1, B or I of stage s hands its input
gradient to stage s−1 — through `comm.py` (roles `activation`, `activation_grad`) when
that stage is on another rank, locally otherwise. Activations are kept per (stage,
micro-batch) in each `Stage`, so backwards may come in any order.

Sends never block: each is posted, and the receive the next action needs is posted right
after it, so two neighbours exchanging (1F1B's steady state) can never both wait.
Receives from one peer are posted in the order that peer sends (`ReceiveOrder`: a
message needed before an earlier one of the same peer is posted after it), since
messages between two ranks are matched in posting order. When
the plan proves it safe under NCCL's rule that a send completes only once its receive
is posted (`eager_sends`: true for GPipe and 1F1B), each send is then waited for at once
and its buffer freed as a blocking send would; otherwise sends are waited for at the end
of the step, as PyTorch's own runtime does.
"""

from __future__ import annotations

import torch

from partition.comm import Comm, Pending
from partition.config import RunConfig
from partition.data import Dataset
from partition.model import Layer, compute_copies, make_layer
from partition.plans.schedule import (
    Action,
    Message,
    ReceiveOrder,
    Schedule,
    eager_sends,
    load_schedule,
    needs,
    produces,
    sent_order,
)
from partition.plans.stages import plan_stages
from partition.strategies.base import (
    StepOut,
    build_optimizer,
    compute_dtype,
    finish_step,
    master_dtype,
    recomputes,
    state_bytes,
)
from partition.strategies.stage import Stage
from partition.topology import Topology
from partition.trace import inputs_span, maybe_span

_PHASE = {"activation": "forward", "activation_grad": "backward"}


def pipeline_schedule(cfg: RunConfig) -> Schedule:
    """The validated schedule a config names (a CSV path is read here)."""
    return load_schedule(cfg.strategy.schedule, world=cfg.world_size, micro=cfg.train.microbatches,
                         virtual=cfg.strategy.virtual_stages)


class PipelineRunner:
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor], *, schedule: Schedule | None = None,
                 rows: tuple[int, int] | None = None) -> None:
        """`topo` and `comm` are the pipeline's group (the world, or a hybrid mesh's pp
        dimension); `rows`: the rows of each step's batch this pipeline takes (a hybrid
        mesh's data-parallel replica), all of them by default."""
        self.cfg, self.topo, self.comm, self.data = cfg, topo, comm, data
        self.spec = cfg.spec
        # Masters in train.dtype; activations and their gradients (what crosses between stages)
        # in the compute dtype: bf16 halves those bytes.
        self.dtype, self.cdtype = master_dtype(cfg), compute_dtype(cfg)
        self.schedule = schedule or pipeline_schedule(cfg)
        self.plan = plan_stages(self.spec, self.schedule.stages, cfg.strategy.balance)
        self.stages: dict[int, Stage] = {}
        for s in self.schedule.rank_stages(topo.rank):
            start, end = self.plan[s]
            self.stages[s] = self._make_stage(s, start, end, full)
        self.layers: list[Layer] = [l for st in self.stages.values() for l in st.layers]
        self.compute: list[Layer] = [l for st in self.stages.values() for l in st.compute]
        self.opt = build_optimizer(cfg)
        self.micro = cfg.train.microbatches
        self.rows = rows or (0, cfg.train.batch_size)
        self.mb_rows = (self.rows[1] - self.rows[0]) // self.micro
        self.actions: tuple[Action, ...] = self.schedule.ranks[topo.rank]
        self.eager = eager_sends(self.schedule)
        self._sent_order = sent_order(self.schedule, topo.rank)
        self.first = 0 in self.stages
        self.last = self.schedule.stages - 1 in self.stages
        self.tracer = None  # a trace.Tracer, set by the train loop

    def _make_stage(self, s: int, start: int, end: int, full: dict[str, torch.Tensor]) -> Stage:
        """Stage `s`, layers [start, end): whole layers here (a hybrid mesh shards them)."""
        layers = [make_layer(full, l, dtype=self.dtype, device=self.topo.device)
                  for l in range(start, end)]
        return Stage(self.spec, layers, index=s, compute=compute_copies(layers, self.cdtype),
                     recompute=recomputes(self.cfg))

    def memory_stages(self) -> list[Stage]:
        """For memory.py: the stages that keep activations and hold the grads."""
        return list(self.stages.values())

    # ------------------------------------------------------------ where inputs come from

    def _remote(self, msg: Message | None) -> bool:
        return msg is not None and self.schedule.stage_rank[msg.from_stage] != self.topo.rank

    def _shape(self, msg: Message) -> tuple[int, int]:
        # an activation entering stage s is n_{start(s)} wide; a gradient leaving stage s+1 too
        boundary = self.plan[msg.to_stage][0] if msg.role == "activation" else self.plan[msg.from_stage][0]
        return (self.mb_rows, self.spec.dims[boundary])

    def _post(self, msg: Message) -> None:
        """Post the receive of `msg`, after the same peer's earlier messages not yet posted."""
        for m in self._order.upto(msg):
            self._posted[m] = self.comm.post_recv(self._shape(m), self.cdtype,
                                                  self.schedule.stage_rank[m.from_stage],
                                                  role=m.role, phase=_PHASE[m.role])

    def _input(self, a: Action) -> torch.Tensor | None:
        """What action `a` works on: the data, a local hand-over, a received tensor or dJ/do."""
        S = self.schedule.stages
        msg = needs(a, S)
        if a.kind == "W":
            return None
        if msg is None:  # stage 0's F reads X; the last stage's B/I starts from its loss gradient
            return self._X[a.mb] if a.kind == "F" else self._dloss.pop(a.mb)
        if not self._remote(msg):
            return self._local.pop(msg)
        self._post(msg)
        return self.comm.wait_recv(self._posted.pop(msg))

    # ------------------------------------------------------------ one action

    def _compute(self, a: Action, x: torch.Tensor | None) -> torch.Tensor | None:
        st = self.stages[a.stage]
        if a.kind == "F":
            out = st.forward(x, a.mb)
            if a.stage == self.schedule.stages - 1:
                # The loss gradient is this stage's "received" gradient: keep it for the backward.
                ls, c, g = st.loss(out, self._y[a.mb], self.cfg.train.batch_size)
                self._loss += ls
                self._correct += c or 0
                self._dloss[a.mb] = g
                return None
            return out
        if a.kind == "B":
            return st.backward(x, a.mb, need_input_grad=a.stage > 0)
        if a.kind == "I":
            return st.backward_input(x, a.mb, need_input_grad=a.stage > 0)
        st.backward_weight(a.mb)
        return None

    def _run(self) -> None:
        S = self.schedule.stages
        self._local: dict[Message, torch.Tensor] = {}
        self._posted: dict[Message, Pending] = {}
        self._order = ReceiveOrder(self._sent_order, self.schedule.stage_rank)
        sends: list[Pending] = []
        for i, a in enumerate(self.actions):
            x = self._input(a)
            with maybe_span(self.tracer, str(a), stage=a.stage, kind=a.kind, mb=a.mb):
                out = self._compute(a, x)
            del x
            msg = produces(a, S)
            if msg is not None and out is not None:
                if self._remote_to(msg):
                    sends.append(self.comm.post_send(
                        out, self.schedule.stage_rank[msg.to_stage], role=msg.role,
                        phase=_PHASE[msg.role]))
                else:
                    self._local[msg] = out
            del out
            if i + 1 < len(self.actions):
                nxt = needs(self.actions[i + 1], S)
                if self._remote(nxt):
                    self._post(nxt)
            if self.eager:  # popped, so no name keeps the sent buffer alive after its wait
                while sends:
                    self.comm.wait_send(sends.pop(0))
            self._in_flight_max = max(self._in_flight_max,
                                      sum(st.in_flight for st in self.stages.values()))
        while sends:
            self.comm.wait_send(sends.pop(0))
        assert not self._local and not self._posted and not self._dloss
        assert all(st.idle() for st in self.stages.values())

    def _remote_to(self, msg: Message) -> bool:
        return self.schedule.stage_rank[msg.to_stage] != self.topo.rank

    # ------------------------------------------------------------ the step

    def _inputs(self, step: int) -> None:
        """Only the rank holding stage 0 reads X, only the one holding the last stage reads y."""
        t = self.cfg.train
        idx = self.data.rows(step, t.batch_size, shuffle=self.cfg.data.shuffle,
                             seed=self.cfg.seed)[slice(*self.rows)]
        dev = self.topo.device
        self._X = self.data.X[idx].to(device=dev, dtype=self.cdtype).chunk(self.micro) if self.first else None
        if self.last:
            self._y = self.data.targets(idx, device=dev, dtype=self.dtype).chunk(self.micro)
        else:
            self._y = None

    def step(self, step: int, *, want_grads: bool) -> StepOut:
        for st in self.stages.values():
            st.start_step()
        with inputs_span(self.tracer):
            self._inputs(step)
        self._loss, self._correct, self._in_flight_max = 0.0, 0, 0
        self._dloss: dict[int, torch.Tensor] = {}
        self._run()
        self._X = self._y = None
        return self._finish(want_grads)

    def _finish(self, want_grads: bool) -> StepOut:
        # J = L + s: L lives on the last stage, each stage holds its part of s.
        return finish_step(layers=self.layers, grads=[g for st in self.stages.values() for g in st.grads],
                           counted=self.layers, opt=self.opt, weight_decay=self.spec.weight_decay,
                           comm=self.comm, loss_sum=self._loss, correct=self._correct,
                           batch=self.cfg.train.batch_size, want_grads=want_grads,
                           cross_entropy=self.spec.loss == "cross_entropy",
                           in_flight_max=self._in_flight_max, device=self.topo.device,
                           compute=self.compute, tracer=self.tracer)

    def predict(self, step: int, *, exchange: bool = True) -> torch.Tensor | None:
        """A prediction forward through the pipeline (no micro-batching, nothing kept).

        exchange=False: each stage alone, on a locally allocated input of the shape it
        would receive, sending nothing — the same memory, no traffic.
        """
        B = self.rows[1] - self.rows[0]
        S = self.schedule.stages
        out: torch.Tensor | None = None
        sends: list[Pending] = []
        for s, st in sorted(self.stages.items()):
            width = self.spec.dims[self.plan[s][0]]
            if s == 0:
                idx = self.data.rows(step, self.cfg.train.batch_size, shuffle=self.cfg.data.shuffle,
                                     seed=self.cfg.seed)[slice(*self.rows)]
                x = self.data.X[idx].to(device=self.topo.device, dtype=self.cdtype)
            elif s - 1 in self.stages and out is not None:
                x = out  # the previous stage is on this rank: handed over
            elif exchange:
                x = self.comm.recv((B, width), self.cdtype, self.schedule.stage_rank[s - 1],
                                   role="activation", phase="forward")
            else:
                x = torch.zeros((B, width), dtype=self.cdtype, device=self.topo.device)
            out = st.predict(x, exchange=exchange)
            del x
            if s + 1 < S and s + 1 not in self.stages:
                if exchange:
                    sends.append(self.comm.post_send(out, self.schedule.stage_rank[s + 1],
                                                     role="activation", phase="forward"))
                out = None
        for p in sends:
            self.comm.wait_send(p)
        return out if self.last else None

    def state_bytes(self) -> dict[str, int]:
        return state_bytes(self.layers, self.opt.state_bytes(self.layers), self.compute)
