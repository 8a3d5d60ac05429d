"""A short micro-benchmark of this machine for the cost model (`cost.calibrate: true`).

Measures the matmul rate of the rank's device in the run's dtype, and — with a process
group — the point-to-point α, β (a ping-pong between ranks 0 and 1, one way = half a
round trip) and the all-reduce α, β (time against ring wire bytes), each fitted from a
small and a large message: t(n) = α + n/β. Every crossing goes through `Comm` under the
role `calibration`, outside any step (ledger step None), so no step's ledger sees it.
Takes well under a second on a CPU; the numbers land in result.json
(`predicted.cost_params`, and per rank in `ranks[].calibration`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch

from partition.comm import Comm, Ledger, Transport, ring_wire_bytes

SMALL, LARGE = 1024, 4 * 2**20  # message sizes in bytes
REPEATS = 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one (m, k) @ (k, n) product, best of a few (the first warms up)."""
    m, k, n = (256, 512, 512) if device.type == "cpu" else (4096, 4096, 4096)
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(REPEATS + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b  # (m, k) @ (k, n) -> (m, n)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def _fit(n1: int, t1: float, n2: int, t2: float) -> tuple[float, float]:
    """α, β from two (bytes, seconds) points of t = α + n/β."""
    beta = (n2 - n1) / max(t2 - t1, 1e-9)
    return max(0.0, t1 - n1 / beta), beta


def _ping_pong(comm: Comm, nbytes: int, dtype: torch.dtype) -> float:
    """One-way seconds of an n-byte message between ranks 0 and 1 (median of REPEATS)."""
    numel = max(1, nbytes // torch.empty((), dtype=dtype).element_size())
    t = torch.zeros(numel, dtype=dtype, device=comm.device)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        if comm.rank == 0:
            comm.send(t, 1, role="calibration", phase="setup")
            comm.recv(t.shape, dtype, 1, role="calibration", phase="setup")
        else:
            r = comm.recv(t.shape, dtype, 0, role="calibration", phase="setup")
            comm.send(r, 0, role="calibration", phase="setup")
        times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times)


def _all_reduce_s(comm: Comm, nbytes: int, dtype: torch.dtype) -> float:
    numel = max(1, nbytes // torch.empty((), dtype=dtype).element_size())
    t = torch.zeros(numel, dtype=dtype, device=comm.device)
    times = []
    for _ in range(REPEATS):
        _sync(comm.device)
        t0 = time.perf_counter()
        comm.all_reduce(t, role="calibration", phase="setup")
        _sync(comm.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(comm: Comm | None, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """This rank's measurements; every rank of the group must call it (collectives)."""
    out: dict[str, Any] = {"flops_per_s": matmul_rate(device, dtype)}
    if comm is None or comm.world_size < 2:
        return out
    P = comm.world_size
    _all_reduce_s(comm, SMALL, dtype)  # everyone here before the ping-pong starts
    if comm.rank < 2:
        t1, t2 = _ping_pong(comm, SMALL, dtype), _ping_pong(comm, LARGE, dtype)
        out["alpha_s"], out["beta_Bps"] = _fit(SMALL, t1, LARGE, t2)
    c1, c2 = _all_reduce_s(comm, SMALL, dtype), _all_reduce_s(comm, LARGE, dtype)
    w1, w2 = ring_wire_bytes("all_reduce", SMALL, P), ring_wire_bytes("all_reduce", LARGE, P)
    out["collective_alpha_s"], out["collective_beta_Bps"] = _fit(w1, c1, w2, c2)
    return out


# ---------------------------------------------------------------- the simulator's durations

ACTION_REPEATS = 3


def _median_s(fn, device: torch.device, repeats: int = ACTION_REPEATS) -> float:  # noqa: ANN001
    """Median seconds of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class AloneTransport(Transport):
    """A collective with no peers: nothing crosses, and what would arrive is this rank's own
    part (an all-reduce leaves its input as it is, an all-gather copies the piece into every
    buffer, a reduce-scatter keeps this rank's chunk). A stage's arithmetic and local copies
    are then timed without waiting for anyone, on finite values."""

    moves = False

    def __init__(self, rank: int = 0) -> None:
        super().__init__(None)
        self.rank = rank

    def on(self, group: Any) -> AloneTransport:
        return AloneTransport(self.rank)

    def all_reduce(self, t: torch.Tensor) -> None:
        pass

    def all_gather(self, bufs: list[torch.Tensor], piece: torch.Tensor) -> None:
        for b in bufs:
            b.copy_(piece)

    def reduce_scatter(self, out: torch.Tensor, ins: list[torch.Tensor]) -> None:
        out.copy_(ins[self.rank])

    def all_gather_into(self, out: torch.Tensor, piece: torch.Tensor) -> None:
        out.view(-1, piece.numel()).copy_(piece.reshape(1, -1))


def _alone(comm: Comm) -> Comm:
    """`comm` on `AloneTransport`, with a ledger of its own: the same rank and group size,
    nothing crossing, nothing recorded in the run's ledger."""
    return Comm(rank=comm.rank, world_size=comm.world_size, ledger=Ledger(),
                device=comm.device, transport=AloneTransport(comm.rank))


@contextmanager
def no_exchange(stage: Any) -> Iterator[None]:
    """A tensor-sharded stage (its `comm` a tp group's) with that Comm swapped for an alone
    one (`_alone`), and a dp-sharded stage's dp Comm too (`stage.sharded.comm`: its weight
    gathers and gradient reduce-scatters become local copies), so timing it needs no peer
    and records nothing in the run's ledger; a whole stage as it is."""
    holders = [(o, o.comm) for o in (stage, getattr(stage, "sharded", None))
               if getattr(o, "comm", None) is not None]
    for o, comm in holders:
        o.comm = _alone(comm)
    try:
        yield
    finally:
        for o, comm in holders:
            o.comm = comm


def _stage_layers(st: Any) -> tuple[int, int]:
    """The first and last layer of a stage: by its tensor plan where it has one (a dp-sharded
    stage's `layers` are pieces, and a piece of a small layer may be empty)."""
    plan = getattr(st, "plan", None)
    if plan is not None:
        return plan[0].layer, plan[-1].layer
    return st.layers[0].index, st.layers[-1].index


def action_times(cfg: Any, runner: Any) -> dict[str, float]:
    """Seconds of each compute action this rank runs, timed at the run's own shapes on
    scratch inputs (the weights are read, never changed; gradients are zeroed after):
    pipeline and hybrid `s<stage>:<F|B|I|W>` (a hybrid stage's tp collectives, and under
    dp_shard its dp gathers and reduce-scatters, not included: `no_exchange` — their local
    copies are), single/data `F` and `B` (one micro-batch), tensor and fsdp
    `F<layer>`/`B<layer>` and `loss`, every strategy `update`; and `peak_flops_per_s`,
    the matmul rate MFU divides by."""
    from partition.model import Grads, Layer, activation_backward, activation_forward, linear
    from partition.model import copy_tensors, linear_backward, loss_and_grad, refresh_copies
    from partition.strategies.base import build_optimizer, compute_dtype, master_dtype

    spec = cfg.spec
    # what forward and backward compute in (bf16 under mixed precision); targets, gradients
    # and the update in the master dtype
    dtype, master = compute_dtype(cfg), master_dtype(cfg)
    recompute = cfg.train.recompute == "full"
    layers = runner.layers
    device = layers[0].W.device if layers else torch.device("cpu")
    if device.type == "meta":
        return {}
    out: dict[str, float] = {"peak_flops_per_s": matmul_rate(device, dtype)}
    B, M = cfg.train.batch_size, cfg.train.microbatches
    q = spec.dims[-1]

    def labels(rows: int) -> torch.Tensor:
        if spec.loss == "cross_entropy":
            return torch.randint(q, (rows,), device=device)
        return torch.randn(rows, q, dtype=master, device=device)

    def time_stage(st: Any, rows: int, prefix: str, *, kinds: str) -> None:
        # the stage's input and output are whole (a tensor-sharded stage's too)
        first_layer, last_layer = _stage_layers(st)
        x = torch.randn(rows, spec.dims[first_layer], dtype=dtype, device=device)
        y = labels(rows)
        last = st.has_output_layer
        need_dx = not st.holds_input
        out_width = spec.dims[last_layer + 1]
        g = torch.randn(rows, out_width, dtype=dtype, device=device) / rows
        mb = -1

        def fwd() -> None:
            o = st.forward(x, mb)
            if last:
                st.loss(o, y, B)

        def drop() -> None:
            st.kept.pop(mb, None)
            st.deferred.pop(mb, None)
            getattr(st, "held", {}).pop(mb, None)  # a dp-sharded forward's kept layers

        out[prefix + "F"] = _median_s(lambda: (fwd(), drop()), device)
        if "B" in kinds:
            out[prefix + "B"] = _median_s(lambda: (fwd(), st.backward(g, mb, need_input_grad=need_dx)),
                                          device) - out[prefix + "F"]
        if "I" in kinds:
            out[prefix + "I"] = _median_s(
                lambda: (fwd(), st.backward_input(g, mb, need_input_grad=need_dx), drop()),
                device) - out[prefix + "F"]
            out[prefix + "W"] = _median_s(
                lambda: (fwd(), st.backward_input(g, mb, need_input_grad=need_dx),
                         st.backward_weight(mb)), device) - out[prefix + "F"] - out[prefix + "I"]
        st.start_step()  # the scratch backwards added to the gradients: zero them

    def time_layers(compute: list[Any], rows: int) -> None:
        """Each layer's F (z = W x and φ) and B (φ', dJ/dW, dJ/dx but for the net's input)
        alone, on scratch inputs of `rows` rows; and the loss."""
        last = spec.num_layers - 1
        for layer in compute:
            x = torch.randn(rows, layer.W.shape[1], dtype=dtype, device=device)
            grads = Grads(torch.zeros_like(layer.W, dtype=master),
                          torch.zeros_like(layer.b, dtype=master) if layer.b is not None
                          else None)

            def fwd(layer=layer, x=x) -> torch.Tensor:  # noqa: ANN001
                z = linear(x, layer)
                return z if layer.index == last else activation_forward(spec.activation, z)

            z = linear(x, layer)
            dz = torch.randn_like(z)

            def bwd(layer=layer, x=x, z=z, dz=dz, grads=grads) -> None:  # noqa: ANN001
                d = dz if layer.index == last else activation_backward(spec.activation, z, dz)
                linear_backward(d, x, layer, grads, need_input_grad=layer.index > 0)

            out[f"F{layer.index}"] = _median_s(fwd, device)
            # recompute: the backward redoes the layer's forward first (all but the output's)
            out[f"B{layer.index}"] = _median_s(bwd, device) + (
                out[f"F{layer.index}"] if recompute and layer.index != last else 0.0)
        o = torch.randn(rows, q, dtype=dtype, device=device)
        y = labels(rows)
        out["loss"] = _median_s(lambda: loss_and_grad(spec, o, y, B, dtype=master), device)

    name = cfg.strategy.name
    if name == "pipeline":
        for s, st in runner.stages.items():
            time_stage(st, B // M, f"s{s}:", kinds="BIW")
    elif name in ("single", "data"):
        rows = B if name == "single" else runner.rows[1] - runner.rows[0]
        time_stage(runner.stage, -(-rows // M), "", kinds="B")  # the largest micro-batch
    elif name == "tensor":
        time_layers(getattr(runner, "compute", layers), B // M)
    elif name == "fsdp":
        # every layer whole, as its gather makes it (scratch weights: the pieces stay as
        # they are); the largest micro-batch of this rank's rows (tensor_split)
        lo, hi = runner.rows
        time_layers([Layer(s.index, torch.randn(s.n_out, s.n_in, dtype=dtype, device=device),
                           torch.randn(s.n_out, dtype=dtype, device=device) if s.bias else None)
                     for s in runner.plan], -(-(hi - lo) // M))
    elif name == "hybrid":
        # each stage's own arithmetic, its tp collectives (and dp_shard's gathers and
        # reduce-scatters) left to the simulator: they are comm ops there, synchronised
        # across their group
        for s, st in runner.stages.items():
            with no_exchange(st):
                time_stage(st, runner.mb_rows, f"s{s}:", kinds="BIW")
        if getattr(runner, "dp_shard", False):
            runner.buffers.release()  # the scratch gathers' buffers: the step makes its own
    read = _inputs_reader(cfg, runner, device, dtype=dtype, master=master)
    if read is not None:
        out["inputs"] = _median_s(read, device)
    if layers:
        from dataclasses import replace

        params = [t for l in layers for t in l.tensors()]
        # the step tail's work on scratch copies (the weights untouched): Σ‖W‖², + λW, the
        # run's optimizer (its state made by a first call), the bf16 copies rounded anew
        scratch = [replace(l, W=l.W.clone(), b=None if l.b is None else l.b.clone())
                   for l in layers]
        grads = [Grads(torch.randn_like(l.W), None if l.b is None else torch.randn_like(l.b))
                 for l in layers]
        opt = build_optimizer(cfg)
        copies = getattr(runner, "compute", layers)
        mixed = bool(copy_tensors(layers, copies))
        targets = [replace(c, W=c.W.clone(), b=None if c.b is None else c.b.clone())
                   for c in copies] if mixed else scratch

        def update() -> None:
            for p in params:
                (p * p).sum()
            opt.step(scratch, grads)
            refresh_copies(scratch, targets)

        out["update"] = _median_s(update, device)
    return {k: max(v, 0.0) for k, v in out.items()}


def _inputs_reader(cfg: Any, runner: Any, device: torch.device, *, dtype: torch.dtype,
                   master: torch.dtype) -> Any:
    """The rank's read of its rows of a step's batch, as its runner does it first thing in a
    step (a gather of rows from the dataset: outside every compute span, and on a stage-0
    rank a good part of the step); None where the dataset is not loaded (a dry run's meta
    rows, `experiments.predict`)."""
    data = runner.data
    if data.X.device.type == "meta":
        return None
    if hasattr(runner, "_inputs"):  # a pipeline (or hybrid) rank: stage 0's X, the last's y
        return lambda: runner._inputs(0)
    t = cfg.train
    lo, hi = getattr(runner, "rows", None) or (0, t.batch_size)  # data, fsdp: the rank's share

    def read() -> None:
        idx = data.rows(0, t.batch_size, shuffle=cfg.data.shuffle, seed=cfg.seed)[lo:hi]
        data.X[idx].to(device=device, dtype=dtype)
        data.targets(idx, device=device, dtype=master)

    return read


# Beyond this many bytes of weights, `experiments.predict` does not build the ranks for real.
LOCAL_CALIBRATION_BYTES = 2**30


def local_action_times(cfg: Any) -> list[dict[str, float]] | None:
    """Every rank's `action_times`, measured in this one process: each distinct rank's runner
    (dryrun.signature) built on the CPU with real weights and a transport that moves
    nothing. None when the weights would not fit comfortably (`LOCAL_CALIBRATION_BYTES`)."""
    from partition.dryrun import DryTransport, meta_dataset, signature
    from partition.model import init_weights
    from partition.plans.data import param_count
    from partition.strategies import build_runner
    from partition.topology import Topology

    item = torch.empty((), dtype=getattr(torch, cfg.train.dtype)).element_size()
    if param_count(cfg.spec) * (item + 8) > LOCAL_CALIBRATION_BYTES:
        return None
    torch.set_num_threads(1)  # one rank's threads, as in a run
    full = init_weights(cfg.spec, cfg.seed)
    cpu = torch.device("cpu")
    done: dict[Any, dict[str, float]] = {}
    out = []
    for r in range(cfg.ranks):
        key = signature(cfg, r)
        if key not in done:
            comm = None if cfg.strategy.name == "single" else Comm(
                rank=r, world_size=cfg.ranks, ledger=Ledger(), device=cpu, transport=DryTransport())
            runner = build_runner(cfg, Topology(r, cfg.ranks, r, cpu, "none"), comm,
                                  meta_dataset(cfg), full)
            done[key] = action_times(cfg, runner)
        out.append(done[key])
    return out


def profile_times(path: str, cfg: Any) -> list[dict[str, float]]:
    """`cost.profile`: the per-rank action times an earlier run's result.json recorded."""
    import json

    with open(path, encoding="utf-8") as f:
        return result_times(json.load(f), cfg, where=path)


def result_times(res: dict[str, Any], cfg: Any, *, where: str,
                 key: str = "action_times") -> list[dict[str, float]]:
    """Each rank's `action_times` (or another key of the same form) in a loaded
    result.json, one per rank of `cfg`."""
    ranks = sorted(res.get("ranks") or [], key=lambda r: r["rank"])
    times = [r.get(key) for r in ranks]
    if len(times) != cfg.ranks or not all(times):
        raise ValueError(f"{where} holds action times for {sum(1 for t in times if t)} ranks, "
                         f"not {cfg.ranks}")
    return times


# ---------------------------------------------------------------- clocks across hosts

CLOCK_ROUNDS = 8


def clock_offset(comm: Comm | None, *, same_host: bool) -> dict[str, Any]:
    """This rank's perf_counter minus rank 0's, and how sure we are of it.

    Ranks of one host share CLOCK_MONOTONIC: offset 0 by construction. Across hosts, rank
    0 and each other rank exchange CLOCK_ROUNDS ping-pongs (role `calibration`, outside
    any step); the round with the shortest round trip gives offset = t_peer − (t_send +
    rtt/2), uncertain by ± rtt/2 (NTP's estimate). Every rank must call it.
    """
    if same_host or comm is None or comm.world_size < 2:
        return {"offset_s": 0.0, "uncertainty_s": 0.0, "source": "one host: shared monotonic clock"}
    f64 = torch.float64
    best = (float("inf"), 0.0)
    mine = {"offset_s": 0.0, "uncertainty_s": 0.0, "source": "rank 0's clock"}
    for peer in range(1, comm.world_size):
        for _ in range(CLOCK_ROUNDS):
            if comm.rank == 0:
                t0 = time.perf_counter()
                comm.send(torch.tensor([t0], dtype=f64), peer, role="calibration", phase="setup")
                t_peer = float(comm.recv((1,), f64, peer, role="calibration", phase="setup")[0])
                t1 = time.perf_counter()
                comm.send(torch.tensor([t_peer - (t0 + (t1 - t0) / 2), (t1 - t0) / 2],
                                       dtype=f64), peer, role="calibration", phase="setup")
            elif comm.rank == peer:
                comm.recv((1,), f64, 0, role="calibration", phase="setup")
                comm.send(torch.tensor([time.perf_counter()], dtype=f64), 0, role="calibration",
                          phase="setup")
                off, half = comm.recv((2,), f64, 0, role="calibration", phase="setup").tolist()
                if half < best[0]:
                    best = (half, off)
    if comm.rank != 0:
        mine = {"offset_s": best[1], "uncertainty_s": best[0],
                "source": f"ping-pong with rank 0, best of {CLOCK_ROUNDS}"}
    return mine


# ---------------------------------------------------------------- strategy.balance=time

# Above this many candidate splits, the split minimising the slowest stage stands in for
# simulating each one.
MAX_SPLITS = 2000


def layer_times(cfg: Any) -> list[dict[str, float]]:
    """F, B, I, W seconds of every layer alone at the run's micro-batch size (F of the last
    layer includes the loss), each timed as a one-layer `Stage` on this process's CPU."""
    from partition.model import compute_copies, init_weights, make_layer
    from partition.strategies.base import compute_dtype, recomputes
    from partition.strategies.stage import Stage

    torch.set_num_threads(1)
    dtype = getattr(torch, cfg.train.dtype)
    full = init_weights(cfg.spec, cfg.seed)
    view = _pipeline_view(cfg)
    out = []
    for l in range(cfg.spec.num_layers):
        lay = [make_layer(full, l, dtype=dtype)]
        st = Stage(cfg.spec, lay, index=l, compute=compute_copies(lay, compute_dtype(cfg)),
                   recompute=recomputes(cfg))
        sub = action_times(view, SimpleNamespace(layers=st.layers, stages={0: st}))
        out.append({k[3:]: v for k, v in sub.items() if k.startswith("s0:")})
    return out


def _pipeline_view(cfg: Any) -> Any:
    from dataclasses import replace

    return replace(cfg, strategy=replace(cfg.strategy, name="pipeline"))


def resolve_balance(cfg: Any) -> Any:
    """`strategy.balance=time`: the split of the layers into stages whose *simulated* step
    (simulate.py, each stage the sum of its layers' measured actions, transfers by the
    boundary width) is shortest; every other setting is returned as it is."""
    from dataclasses import replace

    from partition.plans.schedule import load_schedule
    from partition.plans.stages import compositions, plan_stages
    from partition.simulate import simulate, step_ops
    from partition.timeline import links_of

    if cfg.strategy.name != "pipeline" or cfg.strategy.balance != "time":
        return cfg
    sched = load_schedule(cfg.strategy.schedule, world=cfg.world_size, micro=cfg.train.microbatches,
                          virtual=cfg.strategy.virtual_stages)
    per_layer = layer_times(cfg)
    L, S = cfg.spec.num_layers, sched.stages
    from partition.costs import CostParams

    links = links_of(CostParams.from_config(cfg))

    def step_time(counts: tuple[int, ...]) -> float:
        trial = replace(cfg, strategy=replace(cfg.strategy, balance=counts))
        plan = plan_stages(cfg.spec, S, counts)
        times: list[dict[str, float]] = [{} for _ in range(cfg.world_size)]
        for s, (a, b) in enumerate(plan):
            r = sched.stage_rank[s]
            for kind in "FBIW":
                times[r][f"s{s}:{kind}"] = sum(per_layer[l][kind] for l in range(a, b))
        for r in range(cfg.world_size):
            times[r]["update"] = 0.0
        return simulate(step_ops(trial, times, links, schedule=sched), cfg.world_size).step_time

    cands = compositions(L, S) if _count(L, S) <= MAX_SPLITS else None
    if cands is None:
        costs = tuple(t["F"] + t["B"] for t in per_layer)
        from partition.plans.stages import _min_max_split

        best = tuple(_min_max_split(costs, S))
    else:
        best = min(cands, key=step_time)
    return replace(cfg, strategy=replace(cfg.strategy, balance=best))


def _count(n: int, k: int) -> int:
    from math import comb

    return comb(n - 1, k - 1)
