"""What one device can do instead (issue 18): recomputation, bf16, Adam — on every strategy.

- recompute: weights bit-identical to no recompute (float64; single, pipeline GPipe, 1F1B
  and a CSV with I/W, tensor both layouts and a deep Megatron net, data), the kept
  activations exactly the stage inputs (measured = dry run = closed form), the extra
  FLOPs exactly `costs.recompute_flops` (counted from the runners' own products);
- bf16: J after 20 steps on the seed within the documented tolerance of float64, every
  activation crossing exactly half its float32 bytes (the gradient all-reduce not), memory
  measured = dry run;
- adam / adamw: the weights of torch.optim.Adam / AdamW on autograd gradients (float64,
  10 steps) to 1e-12 on every strategy (fsdp's sharded state too), the state exactly
  2 × the parameters the rank updates;
- bad combinations refused with one line, exit status 2.

The P = 2 cases join the shared spawn of strategy_runs (one spawn for every module).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT, make_config
from strategy_runs import observed_matches_ledger, register, results

from partition import costs
from partition.comm import Ledger
from partition.config import ConfigError
from partition.data import load_dataset
from partition.dryrun import FlopCounter, dry_run
from partition.reference import reference_grads
from partition.strategies import build_runner
from partition.topology import single_process
from partition.train import run_rank
from partition.weights import assemble, initial_weights

SPLIT_IW = "0F0,0F1,0I0,0I1,0W0,0W1\n1F0,1I0,1W0,1F1,1I1,1W1\n"  # P = 2, M = 2
_CSV = os.path.join(tempfile.mkdtemp(prefix="one-device-"), "split_iw.csv")
with open(_CSV, "w") as f:
    f.write(SPLIT_IW)

BF16 = {"train.dtype": "float32", "train.precision": "bf16"}

# ---------------------------------------------------------------- the cases at P = 2

RECOMPUTE_BASES = {
    "pipeline-gpipe": {"strategy": "pipeline", "strategy.schedule": "gpipe",
                       "train.microbatches": 4},
    "pipeline-1f1b": {"strategy": "pipeline", "strategy.schedule": "1f1b",
                      "train.microbatches": 4},
    "pipeline-csv-iw": {"strategy": "pipeline", "strategy.schedule": _CSV,
                        "train.microbatches": 2},
    # two stages per rank on a 4-layer net: interleaved 1F1B (B actions) and ZB-V (I and W)
    "pipeline-interleaved-deep": {"strategy": "pipeline", "strategy.schedule": "interleaved_1f1b",
                                  "model.dims": [20, 16, 12, 8, 4], "train.microbatches": 4},
    "pipeline-zbv-iw-deep": {"strategy": "pipeline", "strategy.schedule": "zbv",
                             "model.dims": [20, 16, 12, 8, 4], "train.microbatches": 4},
    "tensor-megatron": {"strategy": "tensor", "train.microbatches": 2},
    "tensor-rowwise": {"strategy": "tensor", "strategy.layout": "rowwise",
                       "train.microbatches": 2},
    # two Megatron pairs: the first pair's row layer is hidden, so its all-reduce crosses
    # again in the recomputation
    "tensor-megatron-deep": {"strategy": "tensor", "model.dims": [20, 16, 12, 8, 4],
                             "train.microbatches": 2},
    "data": {"strategy": "data", "train.microbatches": 2},
}
BF16_BASES = {
    "pipeline": {"strategy": "pipeline", "train.microbatches": 2},
    "tensor-megatron": {"strategy": "tensor"},
    "tensor-rowwise": {"strategy": "tensor", "strategy.layout": "rowwise"},
    "data": {"strategy": "data"},
}
ADAM_BASES = {
    "pipeline": {"strategy": "pipeline", "strategy.schedule": "1f1b", "train.microbatches": 2},
    "tensor-megatron": {"strategy": "tensor"},
    "tensor-rowwise": {"strategy": "tensor", "strategy.layout": "rowwise"},
    "data": {"strategy": "data"},
    "fsdp-zero3": {"strategy": "fsdp", "strategy.zero_stage": 3},  # 1/P of the moments
}
ADAM = {"train.steps": 10, "train.lr": 0.01, "model.bias": True, "model.weight_decay": 0.01,
        "train.betas": [0.8, 0.99], "train.eps": 1e-6}


def _keys() -> list[tuple[str, dict]]:
    out = []
    for name, kw in RECOMPUTE_BASES.items():
        for r in ("none", "full"):
            out.append((f"recompute-{name}-{r}", {**kw, "train.recompute": r}))
    for name, kw in BF16_BASES.items():
        out.append((f"bf16-{name}-fp32", {**kw, "train.dtype": "float32"}))
        out.append((f"bf16-{name}-bf16", {**kw, **BF16}))
    for name, kw in ADAM_BASES.items():
        for opt in ("adam", "adamw"):
            out.append((f"{opt}-{name}", {**kw, **ADAM, "train.optimizer": opt}))
    return out


KEYS = _keys()
NAMES = [k for k, _ in KEYS]


def _configs(P: int):
    """The cases are for P = 2 (the CSV schedule has two rank rows); another module's
    spawn at another P runs none of them."""
    if P != 2:
        return []
    return [make_config(**{**kw, "world_size": P}) for _, kw in KEYS]


register("one_device", _configs)


@pytest.fixture(scope="module")
def p2():
    cfgs, res = results("one_device", 2)
    return {name: (cfg, r) for name, cfg, r in zip(NAMES, cfgs, res, strict=True)}


def _weights(cfg, per_rank) -> dict[str, np.ndarray]:
    return assemble(cfg.spec, [s for r in per_rank for s in r["shards"]], np.dtype("float64"))


def _single_run(**kw):
    cfg = make_config(**{**kw, "strategy": "single", "world_size": 1})
    rec = run_rank(cfg, single_process("cpu"), None, Ledger())
    return cfg, rec


def _dry_memory(cfg) -> list[dict]:
    return [d.memory for d in dry_run(cfg)]


EXACT = ("predict_peak_bytes", "params_bytes", "grads_bytes", "optimizer_bytes",
         "activations_bytes")


def _same_memory(measured: dict, dry: dict, *, spawned: bool) -> None:
    """Measured = dry run. One device: every figure to the byte. Spawned ranks: the same,
    but for the training peak, which gloo's worker thread can raise by a buffer it lets go
    of a moment late (test_memory.check_memory_collectives): at least the dry run's and
    within 5 % of it."""
    assert {k: measured[k] for k in EXACT} == {k: dry[k] for k in EXACT}
    if spawned:
        assert dry["peak_bytes"] <= measured["peak_bytes"] <= 1.05 * dry["peak_bytes"]
    else:
        assert measured["peak_bytes"] == dry["peak_bytes"]


# ---------------------------------------------------------------- recompute


@pytest.mark.parametrize("M", [1, 3])
def test_single_recompute_weights_bit_identical_and_keeps_only_the_input(M):
    kw = {"train.microbatches": M, "train.batch_size": 24, "train.steps": 3}
    cfg0, rec0 = _single_run(**kw)
    cfg1, rec1 = _single_run(**kw, **{"train.recompute": "full"})
    w0, w1 = (assemble(c.spec, r.shards, np.dtype("float64")) for c, r in ((cfg0, rec0),
                                                                            (cfg1, rec1)))
    assert all(np.array_equal(w0[k], w1[k]) for k in w0)
    assert rec0.objective == rec1.objective
    # one device reads its input from the data batch: nothing else is kept
    assert rec1.memory["activations_bytes"] == 0 == costs.recompute_kept_bytes(cfg1, 0)
    assert rec0.memory["activations_bytes"] == costs.kept_activation_bytes(cfg0, 0) > 0
    (dry,) = _dry_memory(cfg1)
    _same_memory(rec1.memory, dry, spawned=False)


@pytest.mark.parametrize("name", list(RECOMPUTE_BASES))
def test_recompute_weights_bit_identical_on_every_strategy(p2, name):
    cfg0, r0 = p2[f"recompute-{name}-none"]
    cfg1, r1 = p2[f"recompute-{name}-full"]
    w0, w1 = _weights(cfg0, r0), _weights(cfg1, r1)
    assert set(w0) == set(w1)
    assert all(np.array_equal(w0[k], w1[k]) for k in w0), name
    assert r0[0]["objective"] == r1[0]["objective"]


@pytest.mark.parametrize("name", list(RECOMPUTE_BASES))
def test_recompute_keeps_the_stage_inputs_measured_equals_dry_run(p2, name):
    cfg, per_rank = p2[f"recompute-{name}-full"]
    _, plain = p2[f"recompute-{name}-none"]
    dry = _dry_memory(cfg)
    for rank, r in enumerate(per_rank):
        kept = r["memory"]["activations_bytes"]
        assert kept == dry[rank]["activations_bytes"] == costs.recompute_kept_bytes(cfg, rank)
        # a deferred W (I/W schedules) needs dJ/dz and x of every layer from its I on,
        # recomputed or not: more than the inputs there, never more than without recomputing
        assert kept <= plain[rank]["memory"]["activations_bytes"]
        _same_memory(r["memory"], dry[rank], spawned=True)
        if not name.startswith("pipeline"):  # collectives: the observer saw what was recorded
            assert observed_matches_ledger(r)
    if name in ("pipeline-gpipe", "pipeline-1f1b"):
        # stage 1 keeps, per micro-batch in flight, the (mb, 256) float64 activation it got
        flight = max(costs.in_flight_per_stage(cfg, 1).values())
        mb = cfg.train.batch_size // cfg.train.microbatches
        assert per_rank[1]["memory"]["activations_bytes"] == flight * mb * 256 * 8
        assert per_rank[0]["memory"]["activations_bytes"] == 0  # stage 0 reads X


def test_recompute_crosses_again_only_for_hidden_layers(p2):
    """Megatron's seed pair ends at the output: nothing crosses again. Rowwise gathers the
    hidden layer's output again, the deep Megatron net all-reduces its first pair's again,
    in phase backward — exactly the plan's calls (plans/tensor.py)."""
    for name in ("tensor-megatron", "tensor-rowwise", "tensor-megatron-deep"):
        cfg0, r0 = p2[f"recompute-{name}-none"]
        cfg1, r1 = p2[f"recompute-{name}-full"]
        step = cfg1.train.steps - 1
        for rank in range(2):
            def calls(r):
                return sorted((x.op, x.role, x.phase, x.sent) for x in r[rank]["records"]
                              if x.step == step and x.op != "recv")

            planned = sorted((m.op, m.role, m.phase, m.sent) for m in costs.messages(cfg1, rank))
            assert calls(r1) == planned, name
            extra = [c for c in calls(r1) if c not in calls(r0)]
            M = cfg1.train.microbatches  # once per micro-batch
            mb = cfg1.train.batch_size // M
            if name == "tensor-megatron":
                assert calls(r1) == calls(r0)
            elif name == "tensor-rowwise":  # (mb, 128) float64 pieces of the hidden layer
                assert extra == [("all_gather", "gather", "backward", mb * 128 * 8)] * M
            else:  # the first pair's row layer: (mb, 12) float64
                assert extra == [("all_reduce", "partial_output", "backward", mb * 12 * 8)] * M


def test_recompute_extra_flops_are_the_closed_form():
    """Counted from the runners' own matrix products (a real CPU step and the dry run):
    recompute adds exactly `costs.recompute_flops`, and `rank_flops` counts it."""
    kw = {"train.batch_size": 24, "train.microbatches": 2, "train.steps": 2}
    counted = {}
    for r in ("none", "full"):
        cfg = make_config(**kw, **{"train.recompute": r})
        data = load_dataset(cfg.data, cfg.spec, seed=cfg.seed)
        full = initial_weights(cfg.spec, init="seeded", init_path=None, seed=cfg.seed)
        runner = build_runner(cfg, single_process("cpu"), None, data, full)
        with FlopCounter() as fc:
            runner.step(0, want_grads=False)
        counted[r] = fc.flops
        assert fc.flops == costs.rank_flops(cfg, 0)["total"]
    extra = costs.recompute_flops(make_config(**kw, **{"train.recompute": "full"}), 0)
    assert counted["full"] - counted["none"] == extra == 2 * 24 * 784 * 256  # W¹ only
    for base in RECOMPUTE_BASES.values():
        for r in ("none", "full"):
            cfg = make_config(**{**base, "world_size": 2, "train.recompute": r})
            for d in dry_run(cfg):
                f = costs.rank_flops(cfg, d.rank)
                assert d.flops == f["total"]
                assert f["recompute"] == costs.recompute_flops(cfg, d.rank)
                assert (f["recompute"] > 0) == (r == "full" and any(
                    l.index < cfg.spec.num_layers - 1 for l in costs.stage_layers(cfg, d.rank)))


# ---------------------------------------------------------------- bf16


def test_bf16_final_loss_within_the_stated_tolerance_of_float64():
    kw = {"train.steps": 20, "train.grad_check": True}
    cfg64, rec64 = _single_run(**kw)
    cfg16, rec16 = _single_run(**kw, **BF16)
    J64, J16 = rec64.objective, rec16.objective
    tol = costs.bf16_loss_tolerance(cfg16, J64)
    err = abs(J16[-1] - J64[-1])
    assert err <= tol, (err, tol)
    assert err > 0  # bf16 does round: the comparison means something
    # the tolerance from the run's own curve (what result.json records) is the same to O(u²)
    assert costs.bf16_loss_tolerance(cfg16, J16) == pytest.approx(tol, rel=0.05)
    # the grad check reports what bf16 achieved: far above float64's, below 1
    assert rec64.grad_rel_err < 1e-12 < 1e-3 < rec16.grad_rel_err < 0.5
    check = costs.precision_check(cfg16, J16)
    assert check["unit_roundoff"] == 2.0**-8 and check["growth"] == {"forward": 6, "step": 12}
    assert costs.precision_check(cfg64, J64) == {}


def test_bf16_single_state_and_memory_equal_the_dry_run():
    cfg, rec = _single_run(**BF16)
    params = sum(cfg.spec.layer_params(l) for l in range(cfg.spec.num_layers))
    assert rec.memory["params_bytes"] == params * (4 + 2)  # float32 masters + bf16 copy
    assert rec.memory["grads_bytes"] == params * 4  # gradients in float32
    (dry,) = _dry_memory(cfg)
    _same_memory(rec.memory, dry, spawned=False)


@pytest.mark.parametrize("name", list(BF16_BASES))
def test_bf16_crossings_are_half_of_fp32_and_memory_equals_dry_run(p2, name):
    cfg32, r32 = p2[f"bf16-{name}-fp32"]
    cfg16, r16 = p2[f"bf16-{name}-bf16"]
    step = cfg16.train.steps - 1
    for rank in range(2):
        a = [x for x in r32[rank]["records"] if x.step == step and x.role != "metric"]
        b = [x for x in r16[rank]["records"] if x.step == step and x.role != "metric"]
        assert [(x.op, x.role) for x in a] == [(x.op, x.role) for x in b]
        assert a, name
        for x, y in zip(a, b, strict=True):
            if x.role == "weight_grad":  # data parallel: gradients reduced in float32
                assert (y.sent, y.received, y.wire) == (x.sent, x.received, x.wire)
            else:  # activations and their gradients: bfloat16
                assert 2 * y.sent == x.sent and 2 * y.received == x.received
                assert 2 * y.wire == x.wire
        if name != "pipeline":
            assert observed_matches_ledger(r16[rank])
    dry = _dry_memory(cfg16)
    for rank, r in enumerate(r16):
        _same_memory(r["memory"], dry[rank], spawned=True)
        assert r["memory"]["optimizer_bytes"] == costs.optimizer_state_bytes(cfg16, rank)
    # the closed forms know the halving too
    msgs = costs.messages(cfg16, 0)
    assert sorted(m.sent for m in msgs if m.role not in ("metric", "weight_grad")
                  and m.op != "recv") == sorted(
        x.sent for x in r16[0]["records"] if x.step == step and x.role not in (
            "metric", "weight_grad") and x.op != "recv")


def test_bf16_seed_peak_closed_form_equals_the_dry_run():
    """The comparison's full batch in bf16 (docs/one-device.md): the closed form's peak is
    the first layer's bfloat16 weight-gradient product, to the byte."""
    cfg = make_config(**{"model.dims": [784, 2048, 10], "train.batch_size": 1024, **BF16})
    (dry,) = _dry_memory(cfg)
    f = costs.formula(cfg, 0)
    assert f["peak_bytes"] == dry["peak_bytes"] == 33_689_600
    assert f["params_bytes"] == dry["params_bytes"] and f["activations_bytes"] == dry[
        "activations_bytes"] == 2 * 1024 * 2048 * 2


# ---------------------------------------------------------------- adam / adamw


def adam_reference(cfg) -> dict[str, np.ndarray]:
    """Full weights after cfg.train.steps of torch.optim.Adam / AdamW on autograd gradients
    of J (float64): λ on the weights only — Adam's as L2 (its weight_decay adds λW to the
    gradient), AdamW's decoupled — the biases in a group without decay."""
    spec, t = cfg.spec, cfg.train
    data = load_dataset(cfg.data, spec, seed=cfg.seed)
    W0 = initial_weights(spec, init="seeded", init_path=None, seed=cfg.seed)
    params = {k: v.double().clone().requires_grad_(True) for k, v in W0.items()}
    lam = spec.weight_decay
    groups = [{"params": [p for k, p in params.items() if k.startswith("W")], "weight_decay": lam},
              {"params": [p for k, p in params.items() if k.startswith("b")], "weight_decay": 0.0}]
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    opt = cls([g for g in groups if g["params"]], lr=t.lr, betas=tuple(t.betas), eps=t.eps,
              foreach=False)
    for step in range(t.steps):
        X, y = data.batch(step, t.batch_size, shuffle=cfg.data.shuffle, seed=cfg.seed,
                          dtype=torch.float64)
        # the data term only: Adam adds λW itself (L2), AdamW decays the weights
        plain = {k: v.detach() for k, v in params.items()}
        _, g = reference_grads(replace(spec, weight_decay=0.0), plain, X, y)
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()
    return {k: v.detach().numpy() for k, v in params.items()}


def _max_rel(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    assert set(got) == set(want)
    return max(float(np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])) for k in want)


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_single_adam_equals_torch_optim(opt):
    cfg, rec = _single_run(**ADAM, **{"train.optimizer": opt})
    got = assemble(cfg.spec, rec.shards, np.dtype("float64"))
    assert _max_rel(got, adam_reference(cfg)) <= 1e-12
    params = sum(cfg.spec.layer_params(l) for l in range(cfg.spec.num_layers))
    assert rec.memory["optimizer_bytes"] == 2 * params * 8 == costs.optimizer_state_bytes(cfg, 0)
    (dry,) = _dry_memory(cfg)
    _same_memory(rec.memory, dry, spawned=False)


@pytest.mark.parametrize("name", list(ADAM_BASES))
@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_adam_equals_torch_optim_on_every_strategy(p2, name, opt):
    cfg, per_rank = p2[f"{opt}-{name}"]
    assert _max_rel(_weights(cfg, per_rank), adam_reference(cfg)) <= 1e-12
    dry = _dry_memory(cfg)
    for rank, r in enumerate(per_rank):
        assert r["memory"]["optimizer_bytes"] == costs.optimizer_state_bytes(cfg, rank)
        if name != "fsdp-zero3":  # fsdp's params include the padding of its pieces
            assert r["memory"]["optimizer_bytes"] == 2 * r["memory"]["params_bytes"]
        assert costs.formula(cfg, rank)["optimizer_bytes"] == r["memory"]["optimizer_bytes"]
        _same_memory(r["memory"], dry[rank], spawned=True)


def test_adamw_grad_check_still_compares_dJ_dW():
    """AdamW keeps λW out of the gradient it steps on; the check still sees ∂J/∂W."""
    _, rec = _single_run(**ADAM, **{"train.optimizer": "adamw", "train.grad_check": True})
    assert rec.grad_rel_err < 1e-12


# ---------------------------------------------------------------- configuration


def test_precision_follows_dtype_unless_given():
    assert make_config(**{"train.dtype": "float64"}).train.precision == "fp64"
    assert make_config(**{"train.dtype": "float32"}).train.precision == "fp32"
    assert make_config(**BF16).train.precision == "bf16"


@pytest.mark.parametrize("kw,says", [
    ({"train.precision": "bf16", "train.dtype": "float64"}, "float32 master weights"),
    ({"train.precision": "fp64", "train.dtype": "float32"}, "train.dtype=float64"),
    ({"train.precision": "fp32", "train.dtype": "float64"}, "train.dtype=float32"),
    ({"train.precision": "fp16"}, "must be one of"),
    ({"train.recompute": "some"}, "must be one of"),
    ({"train.optimizer": "lamb"}, "must be one of"),
    ({"train.optimizer": "adam", "train.momentum": 0.9}, "SGD's"),
    ({"train.betas": [0.9]}, "two numbers"),
    ({"train.betas": [0.9, 1.0]}, "[0, 1)"),
    ({"train.eps": 0}, "> 0"),
    ({"engine": "torch", "strategy": "data", "world_size": 2, "train.recompute": "full"},
     "engine=explicit"),
    ({"strategy": "fsdp", "world_size": 2, "train.dtype": "float32", "train.precision": "bf16"},
     "strategy=fsdp runs"),
])
def test_nonsense_is_refused_with_the_key(kw, says):
    with pytest.raises(ConfigError) as e:
        make_config(**kw)
    assert says in str(e.value)


BAD = [
    (["train.precision=bf16", "train.dtype=float64"], "train.precision=bf16"),
    (["train.optimizer=lamb"], "train.optimizer=lamb"),
    (["train.precision=fp16"], "train.precision=fp16"),
    (["train.recompute=half"], "train.recompute=half"),
]


@pytest.mark.parametrize("args,says", BAD, ids=[b[0][0] for b in BAD])
def test_bad_input_exits_2_with_one_line(args, says, tmp_path, monkeypatch, capsys):
    from experiments.run import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["experiments.run", "model.dims=[6,5,3]",
                                      "train.batch_size=8", "device=cpu", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert says in lines[0] and "Traceback" not in out.err
    assert os.listdir(tmp_path) == []


def test_bad_input_on_the_command_line():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cwd = tempfile.mkdtemp(prefix="bad-one-device-")
    p = subprocess.run([sys.executable, "-m", "experiments.run", "train.precision=bf16",
                        "train.dtype=float64"], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "train.precision=bf16" in p.stderr
    assert os.listdir(cwd) == []
