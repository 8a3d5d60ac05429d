"""Pipeline schedules as data: validation, lowering, user CSV schedules, the I/W split."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from conftest import ROOT, make_config, spawn

from partition.comm import Ledger
from partition.config import ConfigError
from partition.plans.schedule import (
    Action,
    Message,
    ReceiveOrder,
    ScheduleError,
    eager_sends,
    format_grid,
    from_csv,
    in_flight,
    named_schedule,
    time_slots,
    transfers,
)
from partition.topology import single_process
from partition.train import run_rank
from partition.weights import assemble

# The two user schedules (P = 2, M = 3 and M = 2): neither GPipe nor 1F1B.
EAGER_BACKWARDS = "0F0,0F1,0F2,0B0,0B1,0B2\n1F0,1B0,1F1,1B1,1F2,1B2\n"
SPLIT_IW = "0F0,0F1,0I0,0I1,0W0,0W1\n1F0,1I0,1W0,1F1,1I1,1W1\n"


def _csv(text: str) -> str:
    fd, path = tempfile.mkstemp(suffix=".csv", dir=tempfile.mkdtemp())
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------- pure: parsing and validation


def test_cells_round_trip_in_torchs_text_form():
    s = from_csv(SPLIT_IW, name="x.csv", world=2, micro=2)
    assert s.ranks[0][2] == Action(0, "I", 0) and str(s.ranks[1][2]) == "1W0"
    assert s.stage_rank == (0, 1)
    assert from_csv(s.to_csv(), name="y.csv", world=2, micro=2) == s
    # empty cells are ignored, as in torch's CSV
    assert from_csv("0F0,,0B0\n1F0,1B0,\n", name="z", world=2, micro=1).ranks[0] == (
        Action(0, "F", 0), Action(0, "B", 0))


@pytest.mark.parametrize("text,message", [
    ("0B0,0F0\n1F0,1B0\n", "rank 0 action 0 (0B0) comes before 0F0 on the same rank"),
    ("0F0,0B0\n1F0,1B0\n", "rank 0: stage 0 never runs 0F1"),
    ("0F0,0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1\n", "rank 0 action 1 (0F0) repeats action 0"),
    ("0F0,0F1,0B0,0B1\n1F0,1B0,0F1,1B1\n", "rank 1 action 2 (0F1): stage 0 is already on rank 0"),
    ("0F0,0F1,0B0,0I1,0W1\n1F0,1B0,1F1,1B1\n", None),
    ("0F0,0F1,0B0,0B1,0W1\n1F0,1B0,1F1,1B1\n",
     "rank 0 action 4 (0W1): micro-batch 1 of stage 0 has both B and I/W"),
    ("0F0,0F1,0I0,0B1\n1F0,1B0,1F1,1B1\n", "rank 0: stage 0 never runs 0W0"),
    ("0F0,0B0,0F1,0B1\n1F1,1B1,1F0,1B0\n",
     "rank 1 action 0 (1F1) waits for 0F1, which rank 0 only sends after 0B0, which waits "
     "for rank 1: deadlock"),
    ("0F0,0X1\n1F0,1B0\n", "'0X1' is not an action"),
])
def test_invalid_schedules_are_refused_with_the_action_named(text, message):
    if message is None:  # a valid mix: B for one micro-batch, I/W for the other
        from_csv(text, name="ok", world=2, micro=2)
        return
    with pytest.raises(ScheduleError) as e:
        from_csv(text, name="bad.csv", world=2, micro=2)
    assert message in str(e.value)


def test_messages_may_be_needed_out_of_the_order_they_are_sent():
    """Rank 1 wants 0F1's output first; rank 0 sends 0F0's first. Messages between two
    ranks are matched in posting order, so rank 1 posts 0F0's receive before 0F1's."""
    s = from_csv("0F0,0F1,0B0,0B1\n1F1,1F0,1B0,1B1\n", name="s", world=2, micro=2)
    order = ReceiveOrder.of(s, 1)
    first = Message("activation", 0, 1, 1)
    assert order.upto(first) == [Message("activation", 0, 1, 0), first]
    assert order.upto(Message("activation", 0, 1, 0)) == []  # already posted
    assert eager_sends(s)


def test_a_schedule_for_another_world_size_is_refused():
    with pytest.raises(ScheduleError, match="has 2 rank rows; world_size is 3"):
        from_csv(EAGER_BACKWARDS, name="s.csv", world=3, micro=3)


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("M", [1, 2, 4, 5])
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_named_schedules_are_valid_eager_and_hold_their_bound(name, P, M):
    s = named_schedule(name, world=P, micro=M)
    assert eager_sends(s)  # sends may be waited for at once: freed as a blocking send would
    for r in range(P):
        assert in_flight(s.ranks[r]) == {r: M if name == "gpipe" else min(P - r, M)}
        recv, send = transfers(s, r)
        # every boundary carries each micro-batch once each way
        assert len(send) == M * ((r < P - 1) + (r > 0)) == len(recv)


def test_lowering_derives_sends_from_computation():
    s = from_csv(SPLIT_IW, name="s", world=2, micro=2)
    recv0, send0 = transfers(s, 0)
    assert [(m.role, m.mb) for m in send0] == [("activation", 0), ("activation", 1)]
    assert [(m.role, m.mb) for m in recv0] == [("activation_grad", 0), ("activation_grad", 1)]
    recv1, send1 = transfers(s, 1)
    assert [(m.role, m.mb) for m in send1] == [("activation_grad", 0), ("activation_grad", 1)]
    # I keeps what its W needs: the stage holds a micro-batch from F until W
    assert in_flight(s.ranks[0]) == {0: 2}


def test_grid_marks_idle_slots():
    s = named_schedule("gpipe", world=2, micro=2)
    slots = time_slots(s)
    assert [str(a) if a else "." for a in slots[0]] == ["0F0", "0F1", ".", ".", "0B0", "0B1"]
    assert [str(a) if a else "." for a in slots[1]] == [".", "1F0", "1F1", "1B0", "1B1", "."]
    assert "4 of 12 slots idle" in format_grid(s)


def test_plans_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import partition.plans.schedule, partition.plans.stages, partition.plans.tensor\n"
            "import partition.plans.data, partition.plans.split, partition.plans.traffic\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---------------------------------------------------------------- config and command line


def test_config_validates_the_csv_before_any_rank():
    bad = _csv("0F0,0B0,0F1,0B1\n1F1,1B1,1F0,1B0\n")
    with pytest.raises(ConfigError, match="deadlock"):
        make_config(strategy="pipeline", world_size=2, **{
            "strategy.schedule": bad, "train.microbatches": 2, "model.dims": [8, 6, 4],
            "train.batch_size": 4})
    with pytest.raises(ConfigError, match="no such file|cannot read"):
        make_config(strategy="pipeline", world_size=2, **{
            "strategy.schedule": "/nonexistent/s.csv", "model.dims": [8, 6, 4]})


def test_run_refuses_a_deadlocking_csv_in_one_line(tmp_path):
    bad = _csv("0F0,0B0,0F1,0B1\n1F1,1B1,1F0,1B0\n")
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "strategy=pipeline", "world_size=2",
         f"strategy.schedule={bad}", "train.microbatches=2", f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert lines == [f"error: strategy.schedule={bad}: rank 1 action 0 (1F1) waits for 0F1, "
                     "which rank 0 only sends after 0B0, which waits for rank 1: deadlock"]
    assert not os.path.exists(tmp_path / "run" / "result.json")
    assert not os.path.exists(tmp_path / "run" / "logs")  # no rank was started


def test_schedule_command_prints_the_grid_and_writes_the_csv(tmp_path):
    path = tmp_path / "1f1b.csv"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.schedule", "strategy=pipeline",
         "strategy.schedule=1f1b", "world_size=4", "train.microbatches=8", "--csv", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split()[:5] == ["0", "0F0", "0F1", "0F2", "0F3"]
    assert lines[4].split()[:5] == ["3", ".", ".", ".", "3F0"]
    assert from_csv(path.read_text(), name="p", world=4, micro=8) == named_schedule(
        "1f1b", world=4, micro=8)


# ---------------------------------------------------------------- exact on ranks


def _rank(rank: int, world: int, cfgs: list) -> list[dict]:
    import torch

    from partition.comm import Comm
    from partition.topology import Topology

    out = []
    for cfg in cfgs:
        ledger = Ledger()
        rec = run_rank(cfg, Topology(rank, world, rank, torch.device("cpu"), "gloo"),
                       Comm(rank=rank, world_size=world, ledger=ledger), ledger)
        out.append({"shards": rec.shards, "records": list(ledger.records)})
    return out


def _single_weights(cfg) -> dict[str, np.ndarray]:
    from dataclasses import replace

    one = replace(cfg, strategy=replace(cfg.strategy, name="single", schedule="gpipe"),
                  world_size=1)
    rec = run_rank(one, single_process("cpu"), None, Ledger())
    return assemble(one.spec, rec.shards, np.dtype("float64"))


def test_user_csv_schedules_reproduce_single_device_exactly():
    """The issue's two schedules on P = 2 ranks, float64: the single-device weights (gradient
    accumulation over the same micro-batches: the same products in the same order, so
    the bits agree), and B·n_k·b bytes each way at the boundary."""
    d, h, q, B = 24, 16, 5, 12
    common = {"model.dims": [d, h, q], "model.weight_decay": 0.01, "model.bias": True,
              "train.batch_size": B, "train.steps": 3, "data.num_examples": 40}
    cfgs = [make_config(strategy="pipeline", world_size=2, **common, **{
        "strategy.schedule": _csv(text), "train.microbatches": M})
        for text, M in ((EAGER_BACKWARDS, 3), (SPLIT_IW, 2))]
    out = spawn(_rank, 2, cfgs, timeout=240)
    for i, cfg in enumerate(cfgs):
        per_rank = [out[r][i] for r in range(2)]
        got = assemble(cfg.spec, [s for r in per_rank for s in r["shards"]], np.dtype("float64"))
        want = _single_weights(cfg)
        for k in want:
            assert np.array_equal(got[k], want[k]), (cfg.strategy.schedule, k)
        M = cfg.train.microbatches
        for r, res in enumerate(per_rank):
            last = [x for x in res["records"] if x.step == 2]
            sent = {role: sum(x.sent for x in last if x.role == role and x.op == "send")
                    for role in ("activation", "activation_grad")}
            assert sent == {"activation": B * h * 8 if r == 0 else 0,
                            "activation_grad": B * h * 8 if r == 1 else 0}
            assert sum(x.op == "send" for x in last) == M

