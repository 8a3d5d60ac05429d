"""The analytic model: bytes, memory, FLOPs, bubble and time per rank (DESIGN §3, §6). Pure.

Everything here is a function of the RunConfig (and the device type, since on CPU the
data batch is staged in float64 on the same "device"); nothing runs, nothing is timed.
A strategy is one *rank model*, a function (cfg, rank, device) -> RankCost, in `MODELS`:

    messages      the CommRecords one steady step makes (step=None, seconds = the
                  α + n/β model), so `comm.summarize(messages)` has exactly the keys
                  and meaning of the measured `ranks[].comm`
    state         params / grads / optimizer bytes (exact: shard sizes × item size)
    train         peak of a training step, its breakdown by category, the kept-activation peak
    predict       peak of a prediction forward (params + the batch + its transients)
    flops         matrix-product FLOPs of one step on this rank (2·m·n·k each)
    in_flight_max micro-batches whose activations are held at once

Memory is predicted by *replaying* the explicit engine's allocations (`_Replay`):
every tensor the engine makes, in the order it makes it, freed when the engine's last
Python reference to it goes — so the peak includes what a closed formula misses (the
backward's masks and products, the loss's temporaries, the buffers a schedule keeps
in local variables, the update's W⊙W). The closed forms are kept next to it
(`kept_activation_bytes`, `independent_estimate`) and the tests check the two agree.
The replay mirrors `model.py`, `strategies/stage.py`, `strategies/single.py`,
`strategies/pipeline/runner.py`, `strategies/tensor/runner.py` and `strategies/data.py`
line by line; a change there that moves a tensor's lifetime shows up as a failing
prediction test, which is the point. The tensor and data messages come from those
runners' own plans (`tensor_calls`, `data_traffic`), so each formula is written once.
Measured against the replay on CPU: exact for single, pipeline and data; for tensor the
training peak can exceed it by a collective's buffers that gloo's worker thread lets go
of late (see tests/test_memory.py), everything else exact.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from partition.comm import CommRecord, ring_wire_bytes, summarize
from partition.config import RunConfig

# One definition of the shard split and the metric vector: the runners' own.
from partition.strategies.tensor.plan import METRIC_BYTES, split_evenly

CATEGORIES = ("params", "grads", "optimizer", "input", "activations", "gathered", "comm",
              "temporaries")  # memory.CATEGORIES
ITEMSIZE = {"float32": 4, "float64": 8}
INDEX = 8  # int64 row indices and class labels
DIGITS_EXAMPLES = 1797


# ---------------------------------------------------------------- shard plans (pure)


def _width(r: tuple[int, int]) -> int:
    return r[1] - r[0]


@dataclass(frozen=True)
class LocalLayer:
    """Layer `index` as one rank holds it: the local (n_in, n_out) of its W, and its bias."""

    index: int
    n_in: int
    n_out: int
    bias: bool  # this rank holds (and updates) a bias slice
    out_full: bool = True  # the output after this layer's communication is full width
    note: str = ""

    @property
    def weights(self) -> int:
        return self.n_in * self.n_out

    @property
    def params(self) -> int:
        return self.weights + (self.n_out if self.bias else 0)


def stage_layers(cfg: RunConfig, rank: int) -> list[LocalLayer]:
    """The layers (whole or sharded) that `rank` holds under cfg's strategy."""
    n, L, bias = cfg.model.dims, len(cfg.model.dims) - 1, cfg.model.bias
    name = cfg.strategy.name
    if name in ("single", "data"):
        return [LocalLayer(l, n[l], n[l + 1], bias) for l in range(L)]
    if name == "pipeline":
        from partition.strategies.pipeline.plan import plan_stages

        s, e = plan_stages(cfg.spec, cfg.world_size, cfg.strategy.balance)[rank]
        return [LocalLayer(l, n[l], n[l + 1], bias) for l in range(s, e)]
    if name == "tensor":
        return tensor_layers(tuple(n), cfg.world_size, rank, cfg.strategy.layout, bias=bias)
    raise ValueError(f"no cost model for strategy {name!r}")


def tensor_layers(dims: tuple[int, ...], world: int, rank: int, layout: str, *,
                  bias: bool) -> list[LocalLayer]:
    """Tensor-parallel shards (DESIGN §3), as `tensor.plan.plan_layers` gives them.

    megatron: pairs (2k, 2k+1): W_{2k} by rows (its hidden units R_r), W_{2k+1} by the
    matching columns; the row-parallel bias lives on rank 0; an odd last layer is
    replicated. rowwise: every W_l by output rows R_r(n_{l+1}), with its bias slice.
    """
    L = len(dims) - 1
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    if layout == "megatron":
        out = []
        for k in range(L // 2):
            units = _width(split_evenly(dims[2 * k + 1], world)[rank])
            out.append(LocalLayer(2 * k, dims[2 * k], units, bias, out_full=False,
                                  note="column"))
            out.append(LocalLayer(2 * k + 1, units, dims[2 * k + 2], bias and rank == 0,
                                  note="row"))
        if L % 2:
            out.append(LocalLayer(L - 1, dims[L - 1], dims[L], bias, note="replicated"))
        return out
    if layout == "rowwise":
        return [LocalLayer(l, dims[l], _width(split_evenly(dims[l + 1], world)[rank]), bias,
                           out_full=False, note="rowwise") for l in range(L)]
    raise ValueError(f"unknown tensor layout {layout!r}")


def data_rows(batch: int, world: int, rank: int) -> int:
    """Rows of the batch that a data-parallel rank takes (first ranks take one more)."""
    return _width(split_evenly(batch, world)[rank])


def _tensor_split(n: int, parts: int) -> list[int]:
    """torch.tensor_split's piece sizes: the first n mod parts pieces take one more."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# ---------------------------------------------------------------- the machine


@dataclass(frozen=True)
class CostParams:
    """α, β per message kind and the compute rate; from config or a calibration."""

    alpha_s: float = 55e-6
    beta_Bps: float = 5e9
    collective_alpha_s: float = 230e-6
    collective_beta_Bps: float = 2.6e9
    flops_per_s: float = 115e9
    source: str = "config"  # config | calibrated

    @classmethod
    def from_config(cls, cfg: RunConfig) -> CostParams:
        c = cfg.cost
        return cls(c.alpha_s, c.beta_Bps, c.collective_alpha_s, c.collective_beta_Bps,
                   c.flops_per_s, "config")

    def message_s(self, op: str, nbytes: int, wire: int, group: int) -> float:
        """α + n/β: p2p by payload, collectives by ring wire bytes (none alone)."""
        if op in ("send", "recv"):
            return self.alpha_s + nbytes / self.beta_Bps
        if group <= 1:
            return 0.0
        return self.collective_alpha_s + wire / self.collective_beta_Bps

    def as_dict(self) -> dict[str, Any]:
        return {"alpha_s": self.alpha_s, "beta_Bps": self.beta_Bps,
                "collective_alpha_s": self.collective_alpha_s,
                "collective_beta_Bps": self.collective_beta_Bps,
                "flops_per_s": self.flops_per_s, "source": self.source}


# ---------------------------------------------------------------- messages


def _p2p(op: str, role: str, phase: str, peer: int, n: int, world: int) -> CommRecord:
    if op == "send":
        return CommRecord(None, "send", role, phase, peer, world, n, 0, 0, n, 0.0)
    return CommRecord(None, "recv", role, phase, peer, world, 0, n, 0, 0, 0.0)


def _all_reduce(role: str, phase: str, n: int, world: int) -> CommRecord:
    return CommRecord(None, "all_reduce", role, phase, None, world, n, 0, n,
                      ring_wire_bytes("all_reduce", n, world), 0.0)


def pipeline_messages(cfg: RunConfig, rank: int) -> list[CommRecord]:
    """Per micro-batch: activation forward to rank+1, its gradient back to rank−1."""
    from partition.strategies.pipeline.plan import plan_stages

    P, M = cfg.world_size, cfg.train.microbatches
    rows, item = cfg.train.batch_size // M, ITEMSIZE[cfg.train.dtype]
    s, e = plan_stages(cfg.spec, P, cfg.strategy.balance)[rank]
    n_in, n_out = rows * cfg.model.dims[s] * item, rows * cfg.model.dims[e] * item
    out = []
    for _ in range(M):
        if rank > 0:
            out.append(_p2p("recv", "activation", "forward", rank - 1, n_in, P))
            out.append(_p2p("send", "activation_grad", "backward", rank - 1, n_in, P))
        if rank < P - 1:
            out.append(_p2p("send", "activation", "forward", rank + 1, n_out, P))
            out.append(_p2p("recv", "activation_grad", "backward", rank + 1, n_out, P))
    out.append(_all_reduce("metric", "metric", METRIC_BYTES, P))
    return out


def tensor_messages(cfg: RunConfig, rank: int) -> list[CommRecord]:
    """The tensor runner's collectives, from its plan (`tensor.plan.tensor_calls`: the
    byte formulas live there once). megatron: all-reduce of each pair's partial output
    (forward) and of the input gradient of every pair after the first (backward).
    rowwise: all-gather of every layer's output slice, zero-padded to ⌈n/P⌉ (forward),
    reduce-scatter of every layer's input gradient but the first's (backward)."""
    from partition.strategies.tensor.plan import tensor_calls

    P = cfg.world_size
    calls = tensor_calls(cfg.strategy.layout, cfg.model.dims, world=P, rank=rank,
                         batch=cfg.train.batch_size, micro=cfg.train.microbatches,
                         itemsize=ITEMSIZE[cfg.train.dtype])
    return [CommRecord(None, c.op, c.role, c.phase, None, P, c.payload, c.received, c.payload,
                       c.wire, 0.0) for c in calls]


_DATA_PHASE = {"weight_grad": "update", "metric": "metric"}


def data_messages(cfg: RunConfig, rank: int) -> list[CommRecord]:
    """The data runner's all-reduces (`strategies.data.data_traffic`): the flat gradient
    bucket (Σ params·b, one call, phase update) and the metric."""
    from partition.strategies.data import data_traffic

    P = cfg.world_size
    traffic = data_traffic(cfg.spec, world=P, itemsize=ITEMSIZE[cfg.train.dtype])
    return [CommRecord(None, "all_reduce", role, _DATA_PHASE[role], None, P, t.bytes, 0,
                       t.bytes, t.wire, 0.0) for role, t in traffic.items()]


def with_times(records: list[CommRecord], params: CostParams) -> list[CommRecord]:
    """The same records with `seconds` from the α + n/β model (a recv waits as long as its send)."""
    out = []
    for r in records:
        n = r.sent if r.op == "send" else r.received if r.op == "recv" else r.collective
        s = params.message_s(r.op, n, r.wire, r.group_size)
        out.append(CommRecord(r.step, r.op, r.role, r.phase, r.peer, r.group_size, r.sent,
                              r.received, r.collective, r.wire, s))
    return out


# ---------------------------------------------------------------- FLOPs, bubble


def layer_flops(rows: int, layer: LocalLayer, *, input_grad: bool) -> int:
    """Forward, dJ/dW and (if computed) dJ/dx: 2·rows·n_in·n_out each."""
    one = 2 * rows * layer.n_in * layer.n_out
    return one * (3 if input_grad else 2)


def rank_flops(cfg: RunConfig, rank: int) -> int:
    """Matrix-product FLOPs of one step (elementwise work — activations, loss, SGD — is
    O(B·n + params) and left out). dJ/dx is computed for every layer but the net's first."""
    layers = stage_layers(cfg, rank)
    rows = cfg.train.batch_size
    if cfg.strategy.name == "data":
        rows = data_rows(rows, cfg.world_size, rank)
    return sum(layer_flops(rows, l, input_grad=l.index > 0) for l in layers)


def bubble_fraction(cfg: RunConfig) -> float:
    """Ideal idle share of a pipeline step with equal stages: (P−1)/(M+P−1), both schedules."""
    if cfg.strategy.name != "pipeline":
        return 0.0
    P, M = cfg.world_size, cfg.train.microbatches
    return (P - 1) / (M + P - 1)


def in_flight_bound(cfg: RunConfig, rank: int) -> int:
    """Micro-batches whose activations a rank holds at once: GPipe M, 1F1B min(P−i, M)."""
    M = cfg.train.microbatches
    if cfg.strategy.name != "pipeline":
        return 1
    if cfg.strategy.schedule == "gpipe":
        return M
    return min(cfg.world_size - rank, M)


# ---------------------------------------------------------------- closed forms


def state_bytes(cfg: RunConfig, rank: int) -> dict[str, int]:
    """params, grads (one buffer per parameter) and optimizer state (momentum buffers)."""
    item = ITEMSIZE[cfg.train.dtype]
    p = sum(l.params for l in stage_layers(cfg, rank)) * item
    return {"params_bytes": p, "grads_bytes": p,
            "optimizer_bytes": p if cfg.train.momentum else 0}


def kept_per_microbatch(cfg: RunConfig, rank: int) -> int:
    """Bytes one micro-batch keeps for backward on this rank: every layer's input x
    (but the data batch) and every hidden layer's z (for φ'(z))."""
    item, L = ITEMSIZE[cfg.train.dtype], cfg.spec.num_layers
    rows = cfg.train.batch_size // cfg.train.microbatches
    if cfg.strategy.name == "data":
        rows = max(_tensor_split(data_rows(cfg.train.batch_size, cfg.world_size, rank),
                                 cfg.train.microbatches))
    total = 0
    for lay in stage_layers(cfg, rank):
        if lay.index > 0:
            total += rows * lay.n_in
        if lay.index < L - 1:
            total += rows * lay.n_out
    return total * item


def kept_activation_bytes(cfg: RunConfig, rank: int) -> int:
    """The kept-activation peak: micro-batches in flight × what each keeps."""
    return in_flight_bound(cfg, rank) * kept_per_microbatch(cfg, rank)


def independent_estimate(cfg: RunConfig) -> int:
    """The seed's hand count for one device, full batch: params + grads + input X +
    kept activations (z, h of each hidden layer) + the gradient dJ/dh reaching the top
    hidden layer. That is the live set when the backward leaves the output layer; a
    moment later dJ/dz is made, but h (the output layer's cached input) has just gone,
    so the count stays (relu's backward is one fused pass: no mask tensors)."""
    item = ITEMSIZE[cfg.train.dtype]
    B, dims = cfg.train.batch_size, cfg.model.dims
    p = sum(cfg.spec.layer_params(l) for l in range(cfg.spec.num_layers)) * item
    hidden = sum(dims[1:-1])
    top = dims[-2] if len(dims) > 2 else 0
    return 2 * p + B * dims[0] * item + 2 * B * hidden * item + B * top * item


# ---------------------------------------------------------------- the replay


@dataclass
class PhaseMemory:
    """One phase's predicted memory: the peak, its breakdown, each category's own peak."""

    peak_bytes: int
    breakdown: dict[str, int]
    category_peaks: dict[str, int]


class _Sim:
    """Reference-counted buffers: a buffer is freed when its last holder lets go.

    Categories follow the tracker's rules (memory.py): a buffer is tagged upwards when
    the engine would tag it (a received activation becomes `activations` when a forward
    keeps it); the breakdown at the peak uses each buffer's final category, as the
    tracker's does, while each category's own peak follows the tags as they happen.
    """

    _RANK = {"temporaries": 0, "comm": 1, "activations": 2, "input": 3}

    def __init__(self, seeded: dict[str, int]) -> None:
        self.rc: dict[int, int] = {}
        # Sizes and categories stay after a buffer dies: the peak's breakdown needs them.
        self.size: dict[int, int] = {}
        self.cat: dict[int, str] = {}
        self.seeded = {c: seeded.get(c, 0) for c in CATEGORIES}
        self.totals = dict(self.seeded)
        self.live = sum(self.totals.values())
        self.peak = self.live
        self.peak_handles: list[int] = []
        self.cat_peaks = dict(self.totals)
        self._next = 0

    def alloc(self, n: int, cat: str = "temporaries") -> int | None:
        if n <= 0:
            return None
        h = self._next
        self._next += 1
        self.rc[h], self.size[h], self.cat[h] = 1, n, cat
        self.live += n
        self._count(cat, n)
        if self.live > self.peak:
            self.peak = self.live
            self.peak_handles = list(self.rc)
        return h

    def _count(self, cat: str, n: int) -> None:
        self.totals[cat] += n
        self.cat_peaks[cat] = max(self.cat_peaks[cat], self.totals[cat])

    def tag(self, h: int | None, cat: str) -> None:
        if h is None or h not in self.rc or self._RANK[self.cat[h]] >= self._RANK[cat]:
            return
        self.totals[self.cat[h]] -= self.size[h]
        self.cat[h] = cat
        self._count(cat, self.size[h])

    def ref(self, h: int | None) -> int | None:
        if h is not None:
            self.rc[h] += 1
        return h

    def drop(self, *hs: int | None) -> None:
        for h in hs:
            if h is None:
                continue
            self.rc[h] -= 1
            if self.rc[h] == 0:
                n = self.size[h]
                del self.rc[h]
                self.live -= n
                self.totals[self.cat[h]] -= n

    def result(self, exclude: tuple[str, ...] = ()) -> PhaseMemory:
        bd = dict(self.seeded)
        for h in self.peak_handles:
            bd[self.cat[h]] += self.size[h]
        drop = sum(bd[c] for c in exclude)
        for c in exclude:
            bd[c] = 0
        return PhaseMemory(self.peak - drop, bd, dict(self.cat_peaks))


class _Replay:
    """The explicit engine's allocations on one rank, in its order (see the module docstring).

    Layers are `LocalLayer`s: whole for single / pipeline / data, shards for tensor.
    Collectives work in place (all-reduce) and so allocate nothing here.
    """

    def __init__(self, cfg: RunConfig, seeded: dict[str, int], *, device: str) -> None:
        self.cfg = cfg
        self.sim = _Sim(seeded)
        self.item = ITEMSIZE[cfg.train.dtype]
        self.L = cfg.spec.num_layers
        self.d, self.q = cfg.model.dims[0], cfg.model.dims[-1]
        self.act, self.loss_name = cfg.model.activation, cfg.model.loss
        self.cuda = device == "cuda"

    # ------------------------------------------------------------ data.py

    def rows(self, batch: int) -> int | None:
        """Dataset.rows: arange, then % n (shuffle: an epoch permutation, approximately)."""
        if self.cuda:  # indices live on the host
            return None
        s = self.sim
        pos = s.alloc(batch * INDEX)
        if self.cfg.data.shuffle:
            n = {"synthetic": self.cfg.data.num_examples, "digits": DIGITS_EXAMPLES}.get(
                self.cfg.data.name, 0)
            epochs, out = s.alloc(batch * INDEX), s.alloc(batch * INDEX)
            perm, sel = s.alloc(n * INDEX), s.alloc(batch)
            tmp = [s.alloc(batch * INDEX) for _ in range(3)]
            s.drop(*tmp, sel, perm, epochs, pos)
            return out
        idx = s.alloc(batch * INDEX)
        s.drop(pos)
        return idx

    def load_x(self, rows: int) -> int | None:
        """X[idx].to(dtype): gathered in float64 on the host device, then cast."""
        s = self.sim
        if self.cuda:
            return s.alloc(rows * self.d * self.item, "input")
        x64 = s.alloc(rows * self.d * 8, "input" if self.item == 8 else "temporaries")
        if self.item == 8:
            return x64
        x = s.alloc(rows * self.d * self.item, "input")
        s.drop(x64)
        return x

    def load_y(self, rows: int, *, cat: str = "input") -> int | None:
        s = self.sim
        if self.loss_name == "cross_entropy":
            return s.alloc(rows * INDEX, cat)
        if self.cuda:
            return s.alloc(rows * self.q * self.item, cat)
        y64 = s.alloc(rows * self.q * 8, cat if self.item == 8 else "temporaries")
        if self.item == 8:
            return y64
        y = s.alloc(rows * self.q * self.item, cat)
        s.drop(y64)
        return y

    # ------------------------------------------------------------ model.py, stage.py

    def forward(self, layers: list[LocalLayer], rows: int, x: int | None, *,
                out_cat: str) -> tuple[int | None, list[tuple[int | None, int | None]]]:
        """forward_layers(keep=True): per layer z (and h = φ(z) for hidden layers).

        `x` is the caller's (borrowed) input; the caches take their own references.
        The stage's output gets `out_cat` (comm when it is sent on).
        """
        s, it = self.sim, self.item
        caches: list[tuple[int | None, int | None]] = []
        s.tag(x, "activations")  # a received activation, kept now (Stage.forward's probe.kept)
        cur, owned = x, False
        for i, lay in enumerate(layers):
            last_here = i == len(layers) - 1
            if lay.index == self.L - 1:
                z = s.alloc(rows * lay.n_out * it, out_cat)
                caches.append((s.ref(cur), None))
                nxt = z
            else:
                z = s.alloc(rows * lay.n_out * it, "activations")
                h = s.alloc(rows * lay.n_out * it, out_cat if last_here else "activations")
                caches.append((s.ref(cur), z))
                nxt = h
            if owned:
                s.drop(cur)
            cur, owned = nxt, True
        return cur, caches

    def predict_forward(self, layers: list[LocalLayer], rows: int, x: int | None, *,
                        out_cat: str) -> int | None:
        """forward_layers(keep=False): each intermediate goes when the next exists."""
        s, it = self.sim, self.item
        cur, owned, zvar = x, False, None
        for i, lay in enumerate(layers):
            last_here = i == len(layers) - 1
            z = s.alloc(rows * lay.n_out * it, out_cat if (last_here and lay.index == self.L - 1)
                        else "temporaries")
            s.drop(zvar)  # `z = linear(...)` rebinds: the old z goes
            zvar = z
            if lay.index == self.L - 1:
                nxt = s.ref(z)
            else:
                nxt = s.alloc(rows * lay.n_out * it, out_cat if last_here else "temporaries")
            if owned:
                s.drop(cur)
            cur, owned = nxt, True
        s.drop(zvar)
        return cur

    def loss(self, rows: int) -> int | None:
        """Stage.loss: float(loss_sum), correct_count, then loss_grad (which survives)."""
        s, it, q = self.sim, self.item, self.q
        if self.loss_name == "cross_entropy":
            logp = s.alloc(rows * q * it)  # log_softmax
            gth = s.alloc(rows * it)  # .gather
            sm = s.alloc(it)  # .sum()
            s.drop(gth)
            neg = s.alloc(it)
            s.drop(sm, logp, neg)
            am = s.alloc(rows * INDEX)  # argmax
            eq = s.alloc(rows)  # == y (bool)
            s.drop(am)
            cs = s.alloc(INDEX)
            s.drop(eq, cs)
            g = s.alloc(rows * q * it)  # softmax
            ar = s.alloc(rows * INDEX)  # arange
            t = s.alloc(rows * it)  # g[ar, y], then -= 1 and put back
            s.drop(t, ar)
            return g
        diff = s.alloc(rows * q * it)
        sq = s.alloc(rows * q * it)
        sm = s.alloc(it)
        s.drop(sq)
        half = s.alloc(it)
        s.drop(sm, diff, half)
        return s.alloc(rows * q * it)  # (o - y) / B

    def act_backward(self, n: int) -> int | None:
        """activation_backward: the temporaries each φ' needs, leaving dz."""
        s, it = self.sim, self.item
        if self.act == "relu":  # threshold_backward(dh, z, 0): one fused pass, no mask
            return s.alloc(n * it)
        if self.act == "tanh":  # t = tanh(z); dh * (1 - t * t)
            t = s.alloc(n * it)
            t2 = s.alloc(n * it)
            om = s.alloc(n * it)
            s.drop(t2)
            p = s.alloc(n * it)
            s.drop(om, t)
            return p
        sg = s.alloc(n * it)  # sigmoid: dh * s * (1 - s)
        t1 = s.alloc(n * it)
        t2 = s.alloc(n * it)
        p = s.alloc(n * it)
        s.drop(t1, t2, sg)
        return p

    def backward(self, layers: list[LocalLayer], rows: int,
                 caches: list[tuple[int | None, int | None]], g_in: int | None, *,
                 need_input_grad: bool, dx_cat: str = "comm",
                 crossing: frozenset[int] = frozenset()) -> int | None:
        """backward_layers: the caller holds g_in throughout; a layer's cache goes when
        the loop's `cache` variable moves to the next layer down. `crossing`: positions
        whose input gradient is all-reduced in place (tensor megatron), so `comm`."""
        s, it = self.sim, self.item
        g, g_owned = g_in, False
        dz, dz_owned = None, False
        held: tuple[int | None, int | None] | None = None
        for i in range(len(layers) - 1, -1, -1):
            lay = layers[i]
            if held is not None:
                s.drop(*held)
            held = caches[i]
            if lay.index == self.L - 1:
                new_dz, new_owned = g, False
            else:
                new_dz, new_owned = self.act_backward(rows * lay.n_out), True
            if dz_owned:
                s.drop(dz)
            dz, dz_owned = new_dz, new_owned
            if lay.bias:
                s.drop(s.alloc(lay.n_out * it))  # grads.b += dz.sum(0)
            want = need_input_grad or i > 0
            cat = dx_cat if i == 0 else "comm" if i in crossing else "temporaries"
            new_g = s.alloc(rows * lay.n_in * it, cat) \
                if want else None
            if g_owned:
                s.drop(g)
            g, g_owned = new_g, new_g is not None
        if held is not None:
            s.drop(*held)
        if dz_owned:
            s.drop(dz)
        return g

    def decay_sq(self, layers: list[LocalLayer]) -> int | None:
        """decay_sq_sum: a zero scalar, then W ⊙ W and its sum per layer."""
        s, it = self.sim, self.item
        total = s.alloc(it)
        for lay in layers:
            w2 = s.alloc(lay.weights * it)
            sm = s.alloc(it)
            s.drop(w2, sm)
        return total

    # ------------------------------------------------------------ strategies

    def accumulate(self, layers: list[LocalLayer], pieces: list[int]) -> int | None:
        """single / data: forward, loss, backward per micro-batch; returns the last g
        (the runner's `g` variable outlives the loop)."""
        s = self.sim
        g_var = None
        for rows in pieces:
            o, caches = self.forward(layers, rows, None, out_cat="temporaries")
            g = self.loss(rows)
            s.drop(g_var)  # `ls, c, g = st.loss(...)` rebinds after the new g exists
            g_var = g
            s.drop(o)  # del o
            self.backward(layers, rows, caches, g, need_input_grad=False)
        return g_var


def _phase_memory(cfg: RunConfig, rank: int, device: str,
                  body: Callable[[_Replay], None], exclude: tuple[str, ...] = ()) -> PhaseMemory:
    st = state_bytes(cfg, rank)
    seeded = {"params": st["params_bytes"], "grads": st["grads_bytes"],
              "optimizer": st["optimizer_bytes"]}
    rp = _Replay(cfg, seeded, device=device)
    body(rp)
    return rp.sim.result(exclude)


_PREDICT_EXCLUDE = ("grads", "optimizer")


# ------------------------------------------------------------ single


def single_train(rp: _Replay, cfg: RunConfig, layers: list[LocalLayer]) -> None:
    """SingleRunner.step."""
    s, B, M = rp.sim, cfg.train.batch_size, cfg.train.microbatches
    idx = rp.rows(B)
    X = rp.load_x(B)
    y = rp.load_y(B)
    s.drop(idx)
    g = rp.accumulate(layers, [B // M] * M)
    # `del X, y` frees nothing: the loop's last xm / ym views hold them.
    s.drop(rp.decay_sq(layers))  # float(decay_sq_sum(...))
    s.drop(X, y, g)


def single_predict(rp: _Replay, cfg: RunConfig, layers: list[LocalLayer]) -> None:
    """SingleRunner.predict: `X, _ = self._batch(step)`; y is loaded and never used."""
    s, B = rp.sim, cfg.train.batch_size
    idx = rp.rows(B)
    X = rp.load_x(B)
    y = rp.load_y(B, cat="temporaries")
    s.drop(idx)
    out = rp.predict_forward(layers, B, X, out_cat="temporaries")
    s.drop(X, y, out)


# ------------------------------------------------------------ pipeline


def pipeline_train(rp: _Replay, cfg: RunConfig, rank: int, layers: list[LocalLayer]) -> None:
    """PipelineRunner.step: _inputs, the schedule, the update, the metric all-reduce."""
    s, it = rp.sim, rp.item
    P, M, B = cfg.world_size, cfg.train.microbatches, cfg.train.batch_size
    rows = B // M
    first, last = rank == 0, rank == P - 1
    n_in, n_out = layers[0].n_in, layers[-1].n_out
    idx = rp.rows(B)
    X = rp.load_x(B) if first else None
    y = rp.load_y(B) if last else None
    s.drop(idx)
    pending: deque[int | None] = deque()  # the last stage's loss gradients
    fifo: deque[list] = deque()
    out_cat = "temporaries" if last else "comm"

    def recv_x() -> int | None:
        return None if first else s.alloc(rows * n_in * it, "comm")

    def fwd(x: int | None) -> int | None:
        out, caches = rp.forward(layers, rows, x, out_cat=out_cat)
        fifo.append(caches)
        if last:
            pending.append(rp.loss(rows))
        return out

    def bwd(g: int | None) -> int | None:
        return rp.backward(layers, rows, fifo.popleft(), g, need_input_grad=not first)

    def recv_g() -> int | None:
        return pending.popleft() if last else s.alloc(rows * n_out * it, "comm")

    if cfg.strategy.schedule == "gpipe":
        out_var = None
        for _ in range(M):  # out = self._forward(self._recv_forward()); send
            x = recv_x()
            out = fwd(x)
            s.drop(x)  # the argument goes when _forward returns; the cache keeps its own
            s.drop(out_var)
            out_var = out
        for _ in range(M):  # self._send_backward(self._backward(self._recv_backward()))
            g = recv_g()
            dx = bwd(g)
            s.drop(g, dx)
        s.drop(out_var)
    else:
        warmup = min(P - rank - 1, M)
        remaining = M - warmup
        for _ in range(warmup):  # self._send_forward(self._forward(self._recv_forward()))
            x = recv_x()
            out = fwd(x)
            s.drop(x, out)
        x_var = recv_x() if remaining > 0 else None
        out_var = g_var = dx_var = None
        for j in range(remaining):
            out = fwd(x_var)
            s.drop(out_var)
            out_var = out
            g = recv_g()  # send_forward_recv_backward
            s.drop(g_var)
            g_var = g
            dx = bwd(g)
            s.drop(dx_var)
            dx_var = dx
            if j < remaining - 1:  # x = send_backward_recv_forward(dx)
                nx = recv_x()
                s.drop(x_var)
                x_var = nx
        for _ in range(warmup):
            g = recv_g()
            dx = bwd(g)
            s.drop(g, dx)
        s.drop(x_var, out_var, g_var, dx_var)
    s.drop(X, y)  # self._X = self._y = None
    sq = rp.decay_sq(layers)
    metric = s.alloc(METRIC_BYTES, "comm")
    s.drop(sq, metric)


def pipeline_predict(rp: _Replay, cfg: RunConfig, rank: int, layers: list[LocalLayer]) -> None:
    """PipelineRunner.predict(exchange=False), as train.py measures it: each stage alone on a
    local input of the shape it would receive (the same bytes as the receive buffer), its
    output not sent — the same memory as the exchanging forward, with those two buffers
    under `temporaries` instead of `comm`."""
    s, B = rp.sim, cfg.train.batch_size
    if rank == 0:
        idx = rp.rows(B)
        x = rp.load_x(B)
    else:
        idx, x = None, s.alloc(B * layers[0].n_in * rp.item)
    out = rp.predict_forward(layers, B, x, out_cat="temporaries")
    s.drop(out, x, idx)


# ------------------------------------------------------------ data


def data_train(rp: _Replay, cfg: RunConfig, rank: int, layers: list[LocalLayer]) -> None:
    """DataRunner.step: this rank's rows, accumulate, all-reduce the flat grads in place;
    rank 0 alone adds its ‖W‖² (W ⊙ W per layer)."""
    s = rp.sim
    rows = data_rows(cfg.train.batch_size, cfg.world_size, rank)
    idx = rp.rows(cfg.train.batch_size)
    X = rp.load_x(rows)
    y = rp.load_y(rows)
    s.drop(idx)
    g = rp.accumulate(layers, _tensor_split(rows, cfg.train.microbatches))
    if rank == 0:
        for lay in layers:
            w2 = s.alloc(lay.weights * rp.item)
            sm = s.alloc(rp.item)
            s.drop(w2, sm)
    metric = s.alloc(METRIC_BYTES, "comm")
    s.drop(X, y, g, metric)


def data_predict(rp: _Replay, cfg: RunConfig, rank: int, layers: list[LocalLayer]) -> None:
    s = rp.sim
    rows = data_rows(cfg.train.batch_size, cfg.world_size, rank)
    idx = rp.rows(cfg.train.batch_size)
    X = rp.load_x(rows)
    y = rp.load_y(rows, cat="temporaries")
    s.drop(idx)
    out = rp.predict_forward(layers, rows, X, out_cat="temporaries")
    s.drop(X, y, out)


# ------------------------------------------------------------ tensor


def _primary(layer: LocalLayer, rank: int) -> bool:
    """Counted in s (and saved) here: a replicated layer only on rank 0."""
    return layer.note != "replicated" or rank == 0


def tensor_train(rp: _Replay, cfg: RunConfig, rank: int, layers: list[LocalLayer]) -> None:
    """TensorRunner.step: every rank loads the whole batch; per micro-batch forward, loss
    and backward on its shards (megatron: `forward_layers`' lifetimes, the all-reduces in
    place; rowwise: `_rowwise_forward` / `_rowwise_backward`); then ‖W‖² of its primary
    shards (W ⊙ W and its sum each, no zero scalar first) and the metric."""
    s, P = rp.sim, cfg.world_size
    B, M = cfg.train.batch_size, cfg.train.microbatches
    rowwise = cfg.strategy.layout == "rowwise" and P > 1
    idx = rp.rows(B)
    X = rp.load_x(B)
    y = rp.load_y(B)
    s.drop(idx)
    # megatron: an even net's output is a row layer's all-reduced partial sum; the
    # column layers after the first all-reduce their input gradient in place.
    o_cat = "comm" if P > 1 and layers[-1].note == "row" else "temporaries"
    crossing = frozenset(i for i, l in enumerate(layers) if P > 1 and l.note == "column" and i)
    g_var = None
    for rows in [B // M] * M:
        if rowwise:
            o, caches = _rowwise_forward(rp, cfg, rank, layers, rows, keep=True)
        else:
            o, caches = rp.forward(layers, rows, None, out_cat=o_cat)
        g = rp.loss(rows)
        s.drop(g_var)
        g_var = g
        s.drop(o)  # del o
        if rowwise:
            _rowwise_backward(rp, cfg, rank, layers, rows, caches, g)
        else:
            rp.backward(layers, rows, caches, g, need_input_grad=False, crossing=crossing)
    for lay in layers:  # sum(float((l.W * l.W).sum()) for l in self.saved_layers)
        if _primary(lay, rank):
            s.drop(s.alloc(lay.weights * rp.item), s.alloc(rp.item))
    metric = s.alloc(METRIC_BYTES, "comm")
    s.drop(metric, X, y, g_var)


def _gather(rp: _Replay, cfg: RunConfig, layer: LocalLayer, rows: int, h: int | None, *,
            exchange: bool) -> int | None:
    """TensorRunner._gather of a (rows, |R_r|) slice: comm.all_gather's zero-padded piece
    (uneven widths; an even slice is handed in itself) and P receive buffers of ⌈n/P⌉
    columns, the piece gone before torch.cat makes the whole (rows, n), the buffers after.
    exchange=False (`_gather_alone`): the same buffers, none of them a c10d argument."""
    s, it, P = rp.sim, rp.item, cfg.world_size
    n = cfg.model.dims[layer.index + 1]
    big = rows * -(-n // P) * it
    cat = "comm" if exchange else "temporaries"
    piece = s.alloc(big, cat) if n % P else None
    if piece is None and exchange:
        s.tag(h, "comm")
    bufs = [s.alloc(big, cat) for _ in range(P)]
    s.drop(piece)
    whole = s.alloc(rows * n * it, "activations" if exchange and layer.index < rp.L - 1
                    else "temporaries")  # kept as the next layer's input (training)
    s.drop(*bufs)
    return whole


def _rowwise_forward(rp: _Replay, cfg: RunConfig, rank: int, layers: list[LocalLayer],
                     rows: int, *, keep: bool, exchange: bool = True,
                     x: int | None = None) -> tuple[int | None, list]:
    """TensorRunner._forward, rowwise, P > 1: each layer's output slice (z, then h = φ(z))
    is gathered whole for the next; caches keep each layer's whole input and its z slice.
    Variables hold one reference each; `x` is the caller's (borrowed) input."""
    s, it = rp.sim, rp.item
    caches: list[tuple[int | None, int | None]] = []
    x_var, z_var, h_var = s.ref(x), None, None
    for lay in layers:
        last = lay.index == rp.L - 1
        z = s.alloc(rows * lay.n_out * it, "activations" if keep and not last else "temporaries")
        s.drop(z_var)
        z_var = z
        if keep:
            caches.append((s.ref(x_var), None if last else s.ref(z)))
        h = s.ref(z) if last else s.alloc(rows * lay.n_out * it)
        s.drop(h_var)
        h_var = h
        whole = _gather(rp, cfg, lay, rows, h, exchange=exchange)
        s.drop(x_var)
        x_var = whole
    s.drop(z_var, h_var)
    return x_var, caches


def _rowwise_backward(rp: _Replay, cfg: RunConfig, rank: int, layers: list[LocalLayer],
                      rows: int, caches: list, g_in: int | None) -> None:
    """TensorRunner._backward, rowwise: the top layer's dz is a view of the whole dJ/do;
    each dJ/dx (rows, n_in) is a partial sum, reduce-scattered: P contiguous copies of
    its column chunks (none when rows = 1: the chunks are contiguous already) and this
    rank's (rows, |R_r|) result, the copies gone at return, then the partial."""
    s, it, P = rp.sim, rp.item, cfg.world_size
    g_var, dz_var, dx_var, held = s.ref(g_in), None, None, None
    for i in range(len(layers) - 1, -1, -1):
        lay = layers[i]
        if held is not None:
            s.drop(*held)
        held = caches[i]
        dz = s.ref(g_var) if lay.index == rp.L - 1 else rp.act_backward(rows * lay.n_out)
        s.drop(dz_var)
        dz_var = dz
        if lay.bias:
            s.drop(s.alloc(lay.n_out * it))  # grads.b += dz.sum(0)
        dx = s.alloc(rows * lay.n_in * it) if i > 0 else None
        s.drop(dx_var)
        dx_var = dx
        if dx is None:
            break
        widths = [_width(r) for r in split_evenly(cfg.model.dims[lay.index], P)]
        if rows == 1:
            s.tag(dx, "comm")
            ins = []
        else:
            ins = [s.alloc(rows * w * it, "comm") for w in widths]
        out = s.alloc(rows * widths[rank] * it, "comm")
        s.drop(*ins)
        s.drop(dx_var)
        dx_var = out
        s.drop(g_var)
        g_var = s.ref(out)  # g = dx
    if held is not None:
        s.drop(*held)
    s.drop(dz_var, dx_var, g_var)


def tensor_predict(rp: _Replay, cfg: RunConfig, rank: int, layers: list[LocalLayer]) -> None:
    """TensorRunner.predict(exchange=False), as train.py measures it: megatron skips its
    in-place all-reduces (the single device's lifetimes on the shards); rowwise makes
    the gathers' buffers locally."""
    if cfg.strategy.layout != "rowwise" or cfg.world_size == 1:
        single_predict(rp, cfg, layers)
        return
    s, B = rp.sim, cfg.train.batch_size
    idx = rp.rows(B)
    X = rp.load_x(B)
    y = rp.load_y(B, cat="temporaries")
    s.drop(idx)
    out, _ = _rowwise_forward(rp, cfg, rank, layers, B, keep=False, exchange=False, x=X)
    s.drop(out, X, y)


# ---------------------------------------------------------------- rank models


@dataclass
class RankCost:
    """Everything the model predicts for one rank and one steady step."""

    rank: int
    layers: list[LocalLayer]
    messages: list[CommRecord]
    state: dict[str, int]
    train: PhaseMemory
    predict: PhaseMemory
    flops: int
    in_flight_max: int
    extra: dict[str, Any] = field(default_factory=dict)

    def memory(self) -> dict[str, Any]:
        """Mirrors `ranks[].memory` of result.json."""
        return {
            "peak_bytes": self.train.peak_bytes,
            "predict_peak_bytes": self.predict.peak_bytes,
            **self.state,
            "activations_bytes": self.train.category_peaks["activations"],
            "breakdown": self.train.breakdown,
            "predict_breakdown": self.predict.breakdown,
        }


def _model(train: Callable, predict: Callable, messages: Callable | None) -> Callable:
    def rank_model(cfg: RunConfig, rank: int, device: str = "cpu") -> RankCost:
        layers = stage_layers(cfg, rank)
        tr = _phase_memory(cfg, rank, device, lambda rp: train(rp, cfg, rank, layers))
        pr = _phase_memory(cfg, rank, device, lambda rp: predict(rp, cfg, rank, layers),
                           _PREDICT_EXCLUDE)
        return RankCost(rank, layers, messages(cfg, rank) if messages else [],
                        state_bytes(cfg, rank), tr, pr, rank_flops(cfg, rank),
                        in_flight_bound(cfg, rank))

    return rank_model


def _single_train(rp: _Replay, cfg: RunConfig, rank: int, layers: list[LocalLayer]) -> None:
    single_train(rp, cfg, layers)


def _single_predict(rp: _Replay, cfg: RunConfig, rank: int, layers: list[LocalLayer]) -> None:
    single_predict(rp, cfg, layers)


def fsdp_rank_cost(cfg: RunConfig, rank: int, device: str = "cpu") -> RankCost:
    """fsdp from its plan (partition/plans/fsdp.py): the messages and state exactly; memory
    as the plan's closed form — params + grads + optimizer + gathered layers + the
    unsharded gradient being reduce-scattered (a comm buffer) + kept activations — which
    is a floor, not a replay (the batch and the temporaries are left out)."""
    from partition.plans import fsdp as plan

    P, item, st = cfg.world_size, ITEMSIZE[cfg.train.dtype], cfg.strategy
    dims, bias = cfg.model.dims, cfg.model.bias
    shards = plan.shard_plan(dims, world=P, bias=bias)
    calls = plan.fsdp_calls(shards, zero_stage=st.zero_stage,
                            reshard_after_forward=st.reshard_after_forward,
                            micro=cfg.train.microbatches, itemsize=item)
    messages = [CommRecord(None, c.op, c.role, c.phase, None, P, c.payload, c.received,
                           c.payload, c.wire, 0.0) for c in calls]
    messages.append(_all_reduce("metric", "metric", METRIC_BYTES, P))
    rows = data_rows(cfg.train.batch_size, P, rank)
    mem = plan.memory(dims, world=P, rank=rank, rows=rows, micro=cfg.train.microbatches,
                      zero_stage=st.zero_stage, reshard_after_forward=st.reshard_after_forward,
                      bias=bias, momentum=bool(cfg.train.momentum), itemsize=item)
    state = {k: mem[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes")}
    train = dict.fromkeys(CATEGORIES, 0) | {
        "params": mem["params_bytes"], "grads": mem["grads_bytes"],
        "optimizer": mem["optimizer_bytes"], "gathered": mem["gathered_bytes"],
        "comm": mem["grad_buffer_bytes"], "activations": mem["activations_bytes"]}
    one_layer = plan.gathered_bytes(shards, zero_stage=st.zero_stage,
                                    reshard_after_forward=True, itemsize=item)
    pred = dict.fromkeys(CATEGORIES, 0) | {"params": mem["params_bytes"], "gathered": one_layer}
    layers = [LocalLayer(l, dims[l], dims[l + 1], bias) for l in range(len(dims) - 1)]
    return RankCost(rank, layers, messages, state,
                    PhaseMemory(mem["peak_bytes"], train, dict(train)),
                    PhaseMemory(sum(pred.values()), pred, dict(pred)),
                    sum(layer_flops(rows, l, input_grad=l.index > 0) for l in layers), 1,
                    extra={"memory": "closed form (a floor)"})


# One function per strategy: (cfg, rank, device) -> RankCost.
MODELS: dict[str, Callable[..., RankCost]] = {
    "single": _model(_single_train, _single_predict, None),
    "pipeline": _model(pipeline_train, pipeline_predict, pipeline_messages),
    "tensor": _model(tensor_train, tensor_predict, tensor_messages),
    "data": _model(data_train, data_predict, data_messages),
    "fsdp": fsdp_rank_cost,
}


def rank_costs(cfg: RunConfig, *, device: str = "cpu") -> list[RankCost]:
    if cfg.strategy.name not in MODELS:
        raise ValueError(f"no cost model for strategy {cfg.strategy.name!r}")
    model = MODELS[cfg.strategy.name]
    return [model(cfg, r, device) for r in range(cfg.ranks)]


# ---------------------------------------------------------------- time and the whole run


def rank_time(cost: RankCost, params: CostParams, bubble: float) -> dict[str, float]:
    """FLOPs / rate, stretched by the bubble, plus Σ (α + n/β) over the rank's messages."""
    compute = cost.flops / params.flops_per_s
    comm = sum(r.seconds for r in with_times(cost.messages, params))
    return {"compute_s": compute, "comm_s": comm,
            "step_s": compute / (1.0 - bubble) + comm}


def predict(cfg: RunConfig, *, device: str = "cpu",
            params: CostParams | None = None) -> dict[str, Any]:
    """The `predicted` block of result.json: per rank comm, memory and timing, and the run's
    bubble, FLOPs and step time."""
    params = params or CostParams.from_config(cfg)
    costs = rank_costs(cfg, device=device)
    bubble = bubble_fraction(cfg)
    ranks = []
    for c in costs:
        timing = rank_time(c, params, bubble)
        comm = summarize(with_times(c.messages, params))
        ranks.append({"rank": c.rank, "comm": comm, "memory": c.memory(), "timing": timing,
                      "flops": c.flops, "in_flight_max": c.in_flight_max,
                      "layers": [{"index": l.index, "n_in": l.n_in, "n_out": l.n_out}
                                 for l in c.layers]})
    return {
        "ranks": ranks,
        "bubble_fraction": bubble,
        "flops_per_step": sum(c.flops for c in costs),
        "step_time_s": max(r["timing"]["step_s"] for r in ranks),
        "cost_params": params.as_dict(),
        "device": device,
    }


def peak_over_limit(cfg: RunConfig, *, device: str = "cpu") -> tuple[int, int] | None:
    """(rank, predicted peak) of the first rank whose predicted peak exceeds memory_limit."""
    if cfg.memory_limit is None:
        return None
    for c in rank_costs(cfg, device=device):
        if c.train.peak_bytes > cfg.memory_limit:
            return c.rank, c.train.peak_bytes
    return None


# ---------------------------------------------------------------- measured vs predicted


def rel_err(measured: float | None, predicted: float | None) -> float | None:
    """(measured − predicted) / predicted; 0 when both are 0; None when it cannot be said."""
    if measured is None or predicted is None:
        return None
    if predicted == 0:
        return 0.0 if measured == 0 else None
    return (measured - predicted) / predicted


_COMM_KEYS = ("sent_bytes", "recv_bytes", "collective_bytes", "wire_bytes", "messages")
_MEM_KEYS = ("peak_bytes", "predict_peak_bytes", "params_bytes", "grads_bytes",
             "optimizer_bytes", "activations_bytes")


def prediction_error(ranks: list[dict[str, Any]], predicted: dict[str, Any], *,
                     step_time_s: float | None = None,
                     bubble_measured: float | None = None) -> dict[str, Any]:
    """Relative error of every measured figure against its prediction, per rank, with the
    largest absolute one per group (comm bytes, exact memory, peaks, time)."""
    per_rank = []
    worst = {"comm": 0.0, "state": 0.0, "peaks": 0.0}
    mismatches: list[str] = []
    for mr, pr in zip(ranks, predicted["ranks"], strict=False):
        mc, pc = mr.get("comm") or {}, pr["comm"]
        comm = {k: rel_err(mc.get(k), pc.get(k)) for k in _COMM_KEYS}
        roles = set(mc.get("by_role", {})) | set(pc.get("by_role", {}))
        comm["by_role"] = {role: rel_err(mc.get("by_role", {}).get(role, {}).get("bytes", 0),
                                         pc["by_role"].get(role, {}).get("bytes", 0))
                           for role in sorted(roles)}
        mm, pm = mr.get("memory") or {}, pr["memory"]
        mem = {k: rel_err(mm.get(k), pm.get(k)) for k in _MEM_KEYS}
        timing = {k: rel_err((mr.get("timing") or {}).get(k), pr["timing"].get(k))
                  for k in ("step_s", "compute_s", "comm_s")}
        per_rank.append({"rank": mr.get("rank"), "comm": comm, "memory": mem, "timing": timing})
        flat = [(f"comm.{k}", v) for k, v in comm.items() if k != "by_role"]
        flat += [(f"comm.by_role.{k}", v) for k, v in comm["by_role"].items()]
        for key, v in flat:
            if v is None:
                mismatches.append(f"rank {mr.get('rank')} {key}")
            else:
                worst["comm"] = max(worst["comm"], abs(v))
        for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes"):
            if mem[k] is not None:
                worst["state"] = max(worst["state"], abs(mem[k]))
        for k in ("peak_bytes", "predict_peak_bytes"):
            if mem[k] is not None:
                worst["peaks"] = max(worst["peaks"], abs(mem[k]))
    return {
        "ranks": per_rank,
        "step_time_s": rel_err(step_time_s, predicted.get("step_time_s")),
        "bubble_fraction": None if bubble_measured is None
        else bubble_measured - predicted.get("bubble_fraction", 0.0),
        "max_abs": worst,
        "unpredicted": mismatches,
    }

