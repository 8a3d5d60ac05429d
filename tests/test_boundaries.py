"""Per-boundary bytes of a pipeline (result.json `boundaries`), bytes per device, and the
summary line that prints them."""

from __future__ import annotations

from partition.boundaries import boundaries, describe, device_bytes, p2p_sends
from partition.comm import CommRecord
from tests.conftest import make_config


def _rec(op: str, role: str, peer: int | None, sent: int) -> CommRecord:
    return CommRecord(step=3, op=op, role=role, phase="forward", peer=peer, group_size=3,
                      sent=sent, received=0 if op == "send" else sent, collective=0, wire=sent,
                      seconds=0.0)


def test_sends_are_the_stage_crossings_only():
    recs = [_rec("send", "activation", 1, 100), _rec("recv", "activation_grad", 1, 100),
            _rec("all_reduce", "metric", None, 24), _rec("send", "activation_grad", 0, 7)]
    assert p2p_sends(recs) == [{"peer": 1, "role": "activation", "bytes": 100},
                               {"peer": 0, "role": "activation_grad", "bytes": 7}]


def test_three_stages_two_boundaries_each_way():
    # Stage 0 sends 2 micro-batches of 64 B to stage 1, which sends 2 × 32 B on to stage 2;
    # the gradients come back the same way, the same sizes.
    sends = {
        0: [{"peer": 1, "role": "activation", "bytes": 64}] * 2,
        1: [{"peer": 2, "role": "activation", "bytes": 32}] * 2
        + [{"peer": 0, "role": "activation_grad", "bytes": 64}] * 2,
        2: [{"peer": 1, "role": "activation_grad", "bytes": 32}] * 2
        + [{"peer": 1, "role": "metric", "bytes": 24}],
    }
    assert boundaries(sends) == [
        {"from_stage": 0, "to_stage": 1, "from_rank": 0, "to_rank": 1,
         "forward_bytes": 128, "backward_bytes": 128, "messages": 4},
        {"from_stage": 1, "to_stage": 2, "from_rank": 1, "to_rank": 2,
         "forward_bytes": 64, "backward_bytes": 64, "messages": 4},
    ]
    # Stages placed on other ranks keep their stage numbers.
    placed = boundaries({5: [{"peer": 7, "role": "activation", "bytes": 9}],
                         7: [{"peer": 5, "role": "activation_grad", "bytes": 9}]},
                        stage_of={5: 0, 7: 1})
    assert placed == [{"from_stage": 0, "to_stage": 1, "from_rank": 5, "to_rank": 7,
                       "forward_bytes": 9, "backward_bytes": 9, "messages": 2}]
    assert describe(boundaries(sends)[:1]) == "stage 0→1: 128 B fwd, 128 B bwd (4 msgs)"
    assert boundaries({}) == []


def test_device_bytes_keep_the_metric_apart():
    comm = {"by_role": {"activation": {"bytes": 1000, "messages": 4},
                        "metric": {"bytes": 24, "messages": 1}}}
    assert device_bytes(comm) == (1000, 24)
    assert device_bytes({"sent_bytes": 10, "collective_bytes": 5}) == (15, 0)  # no by_role
    assert device_bytes(None) == (None, 0)
    assert device_bytes({}) == (None, 0)


def test_a_pipeline_run_records_its_boundary_and_prints_it(tmp_path):
    from experiments.cli import summary_line
    from partition.launch import run

    B, h, q, M = 32, 24, 4, 4
    cfg = make_config(strategy="pipeline", world_size=2, **{
        "model.dims": [8, h, q], "train.batch_size": B, "train.microbatches": M,
        "train.dtype": "float32", "data.num_examples": 64})
    res = run(cfg, str(tmp_path / "p"))
    assert res["status"] == "ok"
    # Stage 0 holds W¹ (the larger layer): h crosses forward, dJ/dh comes back, per micro-batch.
    assert res["boundaries"] == [{"from_stage": 0, "to_stage": 1, "from_rank": 0, "to_rank": 1,
                                  "forward_bytes": B * h * 4, "backward_bytes": B * h * 4,
                                  "messages": 2 * M}]
    line = summary_line(res, "out")
    assert f"{B * h * 4:,} B/step/device (+24 B metric); stage 0→1: 3,072 B fwd, 3,072 B bwd " \
        "(8 msgs) -> out" in line
    single = run(make_config(**{"model.dims": [8, h, q], "train.batch_size": B,
                                "data.num_examples": 64}), str(tmp_path / "s"))
    assert "boundaries" not in single
    assert ", 0 B/step/device -> out" in summary_line(single, "out")
