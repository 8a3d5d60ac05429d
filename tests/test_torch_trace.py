"""engine=torch's timelines (issue 14): the traced step under torch.profiler, turned into the
explicit engine's spans (partition/engines/profiled.py)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from conftest import make_config

from partition.engines.profiled import CLOCK, MARK, SeenComm, profiler_clock, step_spans
from partition.launch import run
from partition.plans.schedule import Action
from partition.strategies.pipeline import pipeline_schedule

M = 3
ROUND = 5e-10  # trace.json rounds times to 1e-3 µs
# Spans that abut (a compute piece ends where a wait starts) may seem to overlap by up to
# 1.5e-3 µs in trace.json: ts and dur are rounded separately, so an end is off by up to 1e-3.
TOUCH = 2e-3


# ---------------------------------------------------------------- the conversion, by hand


def _ev(name: str, start: float, end: float, *, thread: int = 1, parent=None):  # noqa: ANN001, ANN202
    e = SimpleNamespace(name=name, thread=thread, time_range=SimpleNamespace(start=start, end=end),
                        cpu_parent=parent, cpu_children=[])
    if parent is not None:
        parent.cpu_children.append(e)
    return e


def test_profiler_clock_takes_the_tightest_try():
    events = [_ev(f"{CLOCK}0", 0.0, 2.0), _ev(f"{CLOCK}1", 10.0, 12.0)]
    # try 0: readings 4 µs apart around a 2 µs range, midpoints 1 µs apart -> offset 1.0 ± 1 µs;
    # try 1 says 1.00001 but ± 5 µs
    reads = [(1.0 - 1e-6, 1.0 + 3e-6), (1.0 + 15e-6, 1.0 + 27e-6)]
    clock = profiler_clock(events, reads)
    assert clock["offset_s"] == pytest.approx(1.0, abs=1e-12)
    assert clock["uncertainty_s"] == pytest.approx(1e-6, abs=1e-12)


def test_step_spans_split_calls_waits_and_compute():
    fwd = _ev("Forward 0", 90, 205)  # torch's own range around the first action
    f0 = _ev(MARK + "0F0", 100, 200, parent=fwd)
    _ev("aten::mm", 110, 190, parent=f0)
    b0 = _ev(MARK + "0B0", 510, 600)
    _ev("aten::mm", 515, 595, parent=b0)
    b = _ev(MARK + "B", 700, 900)  # a backward that posts and waits for its all-reduce
    _ev("aten::mm", 700, 750, parent=b)
    _ev("aten::add", 860, 890, parent=b)
    events = [
        _ev(f"{CLOCK}0", 0, 2), fwd, f0, *f0.cpu_children, b0, *b0.cpu_children, b, *b.cpu_children,
        _ev("c10d::send", 210, 220), _ev("gloo:send", 215, 400),  # its wait returns at 400
        _ev("c10d::recv_", 230, 240), _ev("gloo:recv", 235, 500),
        # completes while the thread computes (inside aten::mm 515..595): nobody waited
        _ev("c10d::allreduce_", 502, 508), _ev("gloo:all_reduce", 504, 580, thread=3),
        _ev("c10d::allreduce_", 752, 760, parent=b), _ev("gloo:all_reduce", 755, 850, thread=3),
        # what Comm recorded itself (the J reduction): left to it
        _ev("c10d::allreduce_", 950, 960), _ev("gloo:all_reduce", 955, 990, thread=3),
    ]
    clock = {"offset_s": 1.0}

    def t(us: float) -> float:
        return 1.0 + us * 1e-6

    marks = [("0F0", {"stage": 0, "kind": "F", "mb": 0}), ("0B0", {"stage": 0, "kind": "B", "mb": 0}),
             ("B", {"kind": "B"})]
    seen = [SeenComm("c10d::send", "send", "activation", 768, 1),
            SeenComm("c10d::recv_", "recv", "activation_grad", 768, 1),
            SeenComm("c10d::allreduce_", "all_reduce", "weight_grad", 64, None),
            SeenComm("c10d::allreduce_", "all_reduce", "weight_grad", 32, None)]
    spans = step_spans(events, clock=clock, marks=marks, seen=seen, recorded=[(t(945), t(995))])
    p2p = {"bytes": 768, "peer": 1}
    want = [
        ("send activation", "comm", 210, 220, {"role": "activation", **p2p, "waiting": False}),
        ("post recv activation_grad", "comm", 230, 240,
         {"role": "activation_grad", **p2p, "waiting": False}),
        ("all_reduce weight_grad", "comm", 502, 508,
         {"role": "weight_grad", "bytes": 64, "peer": None, "waiting": False}),
        ("all_reduce weight_grad", "comm", 752, 760,
         {"role": "weight_grad", "bytes": 32, "peer": None, "waiting": False}),
        ("wait send activation", "comm", 240, 400, {"role": "activation", **p2p, "waiting": True}),
        ("wait recv activation_grad", "comm", 400, 500,
         {"role": "activation_grad", **p2p, "waiting": True}),
        ("wait all_reduce weight_grad", "comm", 760, 850,
         {"role": "weight_grad", "bytes": 32, "peer": None, "waiting": True}),
        ("0F0", "compute", 100, 200, {"stage": 0, "kind": "F", "mb": 0, "torch_range": "Forward 0"}),
        ("0B0", "compute", 510, 600, {"stage": 0, "kind": "B", "mb": 0, "torch_range": None}),
        ("B", "compute", 700, 752, {"kind": "B", "torch_range": None}),
        ("B", "compute", 850, 900, {"kind": "B", "torch_range": None}),
    ]
    assert [(n, tid, args) for n, tid, _, _, args in spans] == [(n, tid, a) for n, tid, _, _, a in want]
    for (_, _, a, b, _), (_, _, wa, wb, _) in zip(spans, want):
        assert (a, b) == (pytest.approx(t(wa), abs=1e-12), pytest.approx(t(wb), abs=1e-12))


def test_step_spans_refuse_ranges_the_runner_did_not_open():
    events = [_ev(f"{CLOCK}0", 0, 2), _ev(MARK + "0F0", 10, 20)]
    with pytest.raises(ValueError, match="the runner opened"):
        step_spans(events, clock={"offset_s": 0.0}, marks=[("0F1", {})], seen=[], recorded=[])


# ---------------------------------------------------------------- real runs, P = 2


def _run(folder: str, **over):  # noqa: ANN003, ANN202
    cfg = make_config(world_size=2, engine="torch", **{
        "train.batch_size": 24, "train.steps": 4, "model.dims": [32, 24, 6],
        "train.dtype": "float32", **over})
    res = run(cfg, folder)
    assert res["status"] == "ok", res["error"]
    with open(os.path.join(folder, "trace.json")) as f:
        trace = json.load(f)
    return cfg, res, trace


def _traced(trace: dict, res: dict, rank: int) -> list[dict]:
    step = res["ranks"][rank]["timing"]["traced_step"]
    return sorted((e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == rank
                   and e["args"]["step"] == step), key=lambda e: e["ts"])


def _end(e: dict) -> float:
    return e["ts"] + e["dur"]


def _check_spans(trace: dict, res: dict, rank: int) -> list[dict]:
    """Ordered, nested in the step, waits outside compute, compute sum = traced_compute_s;
    returns the compute spans."""
    mine = _traced(trace, res, rank)
    whole = [e for e in mine if e["name"] == "step"]
    assert len(whole) == 1
    lo, hi = whole[0]["ts"], _end(whole[0])
    compute = [e for e in mine if e["tid"] == 0 and e["name"] != "step"]
    assert all(a["ts"] <= b["ts"] and _end(a) <= b["ts"] + TOUCH for a, b in zip(compute, compute[1:]))
    assert all(lo <= e["ts"] and _end(e) <= hi + TOUCH for e in mine)
    for w in (e for e in mine if e["tid"] == 1 and e["args"].get("waiting")):
        assert all(_end(c) <= w["ts"] + TOUCH or _end(w) <= c["ts"] + TOUCH for c in compute), w
    total = sum(e["dur"] for e in compute) / 1e6
    timing = res["ranks"][rank]["timing"]
    assert total == pytest.approx(timing["traced_compute_s"], abs=len(compute) * ROUND)
    assert timing["idle_fraction"] == pytest.approx(1 - timing["traced_compute_s"]
                                                    / timing["traced_step_s"])
    return compute


def _check_comm(trace: dict, res: dict, rank: int, roles: set[str]) -> None:
    """The profiled calls carry the observer's roles and bytes: per role, what this rank
    handed over adds up to the ledger's (the traced step moved what every steady step does),
    and what its receives posted to its p2p `recv_bytes`."""
    r = res["ranks"][rank]
    assert r["comm_steps_equal"]
    calls = [e for e in _traced(trace, res, rank) if e["tid"] == 1 and not e["args"]["waiting"]]
    assert {e["args"]["role"] for e in calls} == roles
    sent = [e for e in calls if not e["name"].startswith("post recv")]
    for role in roles:
        mine = [e["args"]["bytes"] for e in sent if e["args"]["role"] == role]
        by = r["comm"]["by_role"].get(role, {"bytes": 0, "messages": 0})
        assert (sum(mine), len(mine)) == (by["bytes"], by["messages"]), role
    if "activation" in roles:  # collectives' received bytes are in recv_bytes too
        recv = [e["args"]["bytes"] for e in calls if e["name"].startswith("post recv")]
        assert sum(recv) == r["comm"]["recv_bytes"]


# dualpipev: torch's runtime, whose OVERLAP_F_B ranges each hold two of our actions
PIPELINES = {"gpipe": {}, "1f1b": {},
             "dualpipev": {"model.dims": [32, 24, 24, 24, 6], "train.microbatches": 4}}


@pytest.fixture(scope="module", params=list(PIPELINES))
def pipeline_run(request, tmp_path_factory):
    schedule = request.param
    folder = str(tmp_path_factory.mktemp(f"torch-{schedule}"))
    over = {"strategy.schedule": schedule, "train.microbatches": M, **PIPELINES[schedule]}
    # trace.profiler: the one profiler of the traced step is also exported as torch's trace
    cfg, res, trace = _run(folder, strategy="pipeline", trace={"profiler": True}, **over)
    return schedule, pipeline_schedule(cfg), res, trace, folder  # the explicit engine's plan


def _torch_range_fits(schedule: str, a: Action, got: str | None) -> bool:
    """torch's own range around action `a`: GPipe's `Forward i` / `Backward i`; none in 1F1B;
    the runtime's `PP:<action>`, or the OVERLAP_F_B pair holding it."""
    if schedule == "gpipe":
        return got == {"F": "Forward", "B": "Backward"}[a.kind] + f" {a.mb}"
    if schedule == "1f1b":
        return got is None
    return got == f"PP:{a}" or (got is not None and got.endswith("OVERLAP_F_B") and str(a) in got)


def test_every_action_once_as_the_explicit_engine_names_it(pipeline_run):
    schedule, plan, res, trace, folder = pipeline_run
    assert res["ranks"][0]["timing"]["traced_step"] == 2  # the last quiet steady step
    last = plan.stages - 1
    micro = res["config"]["train"]["microbatches"]
    for r in range(2):
        compute = _check_spans(trace, res, r)
        actions = [e for e in compute if e["args"]["kind"] in "FBIW"]
        assert [e["name"] for e in actions] == [str(a) for a in plan.ranks[r]]
        assert [(e["args"]["stage"], e["args"]["kind"], e["args"]["mb"]) for e in actions] == [
            (a.stage, a.kind, a.mb) for a in plan.ranks[r]]
        assert all(_torch_range_fits(schedule, a, e["args"]["torch_range"])
                   for a, e in zip(plan.ranks[r], actions))
        # the last stage's loss right after each of its forwards; one update at the end
        holds_last = plan.stage_rank[last] == r
        others = [e["name"] for e in compute if e["args"]["kind"] not in "FBIW"]
        assert others == [f"loss{m}" for m in range(micro) if holds_last] + ["update"]
        names = [e["name"] for e in compute]
        assert all(names[names.index(f"{last}F{m}") + 1] == f"loss{m}"
                   for m in range(micro) if holds_last)
        _check_comm(trace, res, r, {"activation", "activation_grad"})
    if schedule == "dualpipev":  # each action of a pair got its own span
        ranges = [e["args"].get("torch_range") for e in _traced(trace, res, 0) if e["tid"] == 0]
        assert any(x and x.endswith("OVERLAP_F_B") for x in ranges)
    clock = trace["otherData"]["clock"]["per_rank"]
    assert all(0 <= clock[str(r)]["profiler"]["uncertainty_s"] < 1e-3 for r in range(2))
    assert os.path.getsize(os.path.join(folder, "timeline.png")) > 10_000


def test_torch_profiler_trace_holds_both_engines_ranges(pipeline_run):
    schedule, plan, res, trace, folder = pipeline_run
    micro = res["config"]["train"]["microbatches"]
    for r in range(2):
        with open(os.path.join(folder, f"profiler_rank{r}.json")) as f:
            names = {e.get("name") for e in json.load(f)["traceEvents"]}
        assert {MARK + str(a) for a in plan.ranks[r]} <= names
        torch_own = {n for n in names if n and n.startswith(("Forward ", "Backward ", "PP:"))}
        if schedule == "gpipe":
            assert torch_own == {f"{k} {m}" for k in ("Forward", "Backward") for m in range(micro)}
        elif schedule == "1f1b":
            assert torch_own == set()
        else:
            assert {f"PP:{a}" for a in plan.ranks[r]} & torch_own


@pytest.mark.parametrize("strategy", ["fsdp"])
def test_sharded_torch_engine_has_forward_backward_update(tmp_path, strategy):
    _, res, trace = _run(str(tmp_path), strategy=strategy)
    for r in range(2):
        compute = _check_spans(trace, res, r)
        # one forward and one backward, cut where the collectives inside them ran
        names = [e["name"] for e in compute]
        assert names[-1] == "update" and names.count("update") == 1
        assert set(names) == {"F", "B", "update"}
        assert names.index("B") > max(i for i, n in enumerate(names) if n == "F")
        _check_comm(trace, res, r, {"weight_gather", "weight_grad"})
    assert os.path.getsize(tmp_path / "timeline.png") > 10_000
