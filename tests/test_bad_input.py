"""The bad-input catalogue: every entry is refused before any rank starts.

The contract (README "When things go wrong"): exit status 2, exactly one line on
stderr naming the key and the value, no traceback, nothing written — the folder
the command ran in stays empty (no outputs/ run or sweep folder).

Every case runs through `experiments.run.main()` in this process (the whole
command-line path but the interpreter start, so the catalogue stays fast); four of
the issue's done-when cases and the torchrun world-size mismatch also run as real
subprocesses, and with `-m slow` every case does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = "{files}"  # replaced by the folder holding the bad files
# A small model, so that cases which get as far as loading data stay quick.
BASE = {"model.dims": "[6,5,3]", "train.batch_size": "8", "train.steps": "2", "device": "cpu"}


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    says: tuple[str, ...]  # what the one line must contain: the key and the value, at least
    done_when: bool = False  # listed in the issue's done-when: also run as a subprocess
    # What the machine must offer: "locked" (a folder nobody may write, see `files`),
    # "rofs" (a read-only mount: only in a private mount namespace, so subprocess only),
    # "no-cuda" (no GPU: device=cuda is then bad input).
    needs: str | None = None

    def argv(self, files: str) -> list[str]:
        args = [a.replace(FILES, files) for a in self.args]
        keys = {a.lstrip("+~").partition("=")[0] for a in args}
        base = [f"{k}={v}" for k, v in BASE.items() if k not in keys]
        return base + args

    def expected(self, files: str) -> list[str]:
        return [s.replace(FILES, files) for s in self.says]


def C(id: str, args: list[str], *says: str, done_when: bool = False,  # noqa: N802
      needs: str | None = None) -> Case:
    return Case(id, tuple(args), tuple(says), done_when, needs)


NPZ = ["data=npz"]
INIT = ["model.init=file"]
SQ = ["model.loss=squared_error"]


CATALOGUE = [
    # sizes and counts
    C("batch-zero", ["train.batch_size=0"], "train.batch_size=0", ">= 1", done_when=True),
    C("batch-negative", ["train.batch_size=-4"], "train.batch_size=-4"),
    C("dims-one-entry", ["model.dims=[784]"], "model.dims=[784]", "at least 2",
      done_when=True),
    C("dims-empty", ["model.dims=[]"], "model.dims=[]"),
    C("dims-zero-width", ["model.dims=[784,0,10]"], "model.dims=[784,0,10]", ">= 1"),
    C("dims-not-a-list", ["model.dims=abc"], "model.dims=abc", "list"),
    C("world-zero", ["world_size=0"], "world_size=0", ">= 1", done_when=True),
    C("world-negative", ["world_size=-1"], "world_size=-1"),
    C("world-fraction", ["world_size=2.5"], "world_size=2.5", "integer"),
    C("stages-more-than-layers", ["strategy=pipeline", "world_size=5"], "world_size=5",
      "2 layers", done_when=True),
    C("balance-wrong-sum", ["strategy=pipeline", "world_size=2", "strategy.balance=[1,2]"],
      "strategy.balance=[1,2]", "sum to the 2 layers"),
    C("balance-wrong-length", ["strategy=pipeline", "world_size=2", "strategy.balance=[2]"],
      "strategy.balance=[2]", "one entry per stage"),
    C("microbatches-not-dividing", ["train.batch_size=10", "train.microbatches=3"],
      "train.microbatches=3", "train.batch_size=10"),
    C("microbatches-zero", ["train.microbatches=0"], "train.microbatches=0"),
    C("steps-zero", ["train.steps=0"], "train.steps=0"),
    C("timeout-zero", ["timeout_s=0"], "timeout_s=0", "> 0"),
    # choices
    C("strategy-unknown", ["strategy=bogus"], "strategy=bogus", "pipeline", done_when=True),
    C("activation-unknown", ["model.activation=swish"], "model.activation=swish", "relu",
      done_when=True),
    C("loss-unknown", ["model.loss=hinge"], "model.loss=hinge", "cross_entropy"),
    C("schedule-unknown", ["strategy=pipeline", "strategy.schedule=zigzag"],
      "strategy.schedule=zigzag", "1f1b"),
    C("layout-unknown", ["strategy=tensor", "strategy.layout=diagonal"],
      "strategy.layout=diagonal", "megatron"),
    C("zero-stage-unknown", ["strategy=fsdp", "strategy.zero_stage=4"],
      "strategy.zero_stage=4", "1, 2, 3"),
    C("zero-stage-keep-weights-stage-2", ["strategy=fsdp", "strategy.zero_stage=2",
                                          "strategy.reshard_after_forward=false"],
      "strategy.reshard_after_forward=False", "zero_stage=3"),
    C("zero-stage-1-on-torch", ["strategy=fsdp", "strategy.zero_stage=1", "engine=torch",
                                "world_size=2"], "strategy.zero_stage=1", "FSDP2"),
    C("dtype-unknown", ["train.dtype=float16"], "train.dtype=float16", "float32"),
    C("device-unknown", ["device=tpu"], "device=tpu", "cuda"),
    C("data-group-unknown", ["data=mnist"], "data=mnist", "synthetic"),
    C("model-group-unknown", ["model=huge"], "model=huge", "seed"),
    C("fault-kind-unknown", ["fault.kind=explode"], "fault.kind=explode", "hang"),
    C("bias-not-a-bool", ["model.bias=maybe"], "model.bias=maybe", "true or false"),
    # numbers
    C("lr-negative", ["train.lr=-0.1"], "train.lr=-0.1", "> 0", done_when=True),
    C("lr-zero", ["train.lr=0"], "train.lr=0"),
    C("lr-non-numeric", ["train.lr=abc"], "train.lr=abc", "number"),
    C("lr-nan", ["train.lr=nan"], "train.lr=nan", "finite"),
    C("lr-bool", ["train.lr=true"], "train.lr=True", "number"),
    C("steps-non-numeric", ["train.steps=ten"], "train.steps=ten", "integer"),
    C("momentum-too-big", ["train.momentum=1.5"], "train.momentum=1.5", "< 1"),
    C("decay-negative", ["model.weight_decay=-1"], "model.weight_decay=-1", ">= 0"),
    C("seed-negative", ["seed=-1"], "seed=-1"),
    C("memory-lots", ["memory_limit=lots"], "memory_limit=lots", "byte count", done_when=True),
    C("memory-negative", ["memory_limit=-5"], "memory_limit=-5", "positive"),
    C("memory-bad-unit", ["memory_limit=12XB"], "memory_limit=12XB"),
    # faults
    C("fault-rank-out-of-range", ["fault.rank=5", "fault.step=1", "fault.kind=raise"],
      "fault.rank=5", "1 ranks"),
    C("fault-incomplete", ["fault.kind=raise"], "fault.kind=raise", "fault.rank"),
    C("fault-step-past-end", ["fault.rank=0", "fault.step=100", "fault.kind=raise"],
      "fault.step=100", "train.steps=2"),
    # the command line itself
    C("override-malformed-list", ["train.lr=[1,"], "train.lr=[1,", "malformed"),
    C("override-no-key", ["=5"], "=5", "no key"),
    C("override-double-dot", ["train..lr=1"], "train..lr=1", "malformed"),
    C("override-no-equals", ["train.lr"], "train.lr", "malformed"),
    C("key-unknown", ["train.bogus=1"], "train.bogus=1", "no such key"),
    C("key-unknown-top-level", ["foo=1"], "foo=1", "no such key"),
    C("key-appended-typo", ["+train.lrr=0.1"], "train.lrr=0.1", "no such key"),
    C("section-not-a-group", ["train=5"], "train=5", "group of keys"),
    C("interpolation-missing", ["train.lr=${train.nope}"], "train.lr=${train.nope}",
      "train.nope"),
    C("sweep-with-one-bad-job", ["-m", "train.batch_size=8,0"], "train.batch_size=0"),
    # data files
    C("data-missing-file", ["data=npz", "data.path={files}/missing.npz"],
      "data.path={files}/missing.npz", "no such file", done_when=True),
    C("data-no-path", ["data=npz"], "data.path", "data=npz"),
    C("data-nan", ["data=npz", "data.path={files}/nan.npz"], "data.path={files}/nan.npz",
      "NaN"),
    C("data-label-too-big", ["data=npz", "data.path={files}/labels.npz"],
      "data.path={files}/labels.npz", "outside [0, 3)"),
    C("data-label-negative", ["data=npz", "data.path={files}/neglabels.npz"],
      "data.path={files}/neglabels.npz", "outside [0, 3)"),
    C("data-float-labels", ["data=npz", "data.path={files}/floatlabels.npz"],
      "data.path={files}/floatlabels.npz", "class indices"),
    C("data-wrong-width", ["data=npz", "data.path={files}/width.npz"],
      "data.path={files}/width.npz", "expected (N, 6)"),
    C("data-no-y", ["data=npz", "data.path={files}/noy.npz"], "data.path={files}/noy.npz",
      "missing array(s) y"),
    C("data-not-npz", ["data=npz", "data.path={files}/garbage.npz"],
      "data.path={files}/garbage.npz", "not an .npz"),
    C("data-pickled", ["data=npz", "data.path={files}/pickled.npz"],
      "data.path={files}/pickled.npz", "allow_pickle=False"),
    C("data-is-a-folder", ["data=npz", "data.path={files}"], "data.path={files}"),
    # initial-weight files
    C("init-wrong-shape", ["model.init=file", "model.init_path={files}/init_shape.npz"],
      "model.init_path={files}/init_shape.npz", "W1 has shape (4, 6), expected (5, 6)"),
    C("init-missing-array", ["model.init=file", "model.init_path={files}/init_missing.npz"],
      "model.init_path={files}/init_missing.npz", "W2"),
    C("init-nan", ["model.init=file", "model.init_path={files}/init_nan.npz"],
      "model.init_path={files}/init_nan.npz", "NaN"),
    C("init-pickled", ["model.init=file", "model.init_path={files}/init_pickled.npz"],
      "model.init_path={files}/init_pickled.npz", "allow_pickle=False"),
    C("init-no-path", ["model.init=file"], "model.init_path", "model.init=file"),
    C("init-missing-file", ["model.init=file", "model.init_path={files}/nope.npz"],
      "model.init_path={files}/nope.npz", "no such file"),
]
CATALOGUE += [
    C("device-cuda-absent", ["device=cuda"], "device=cuda", "cuda", needs="no-cuda"),
    # ------------------------------------------------ issue 19: run folders
    C("run-dir-empty", ["hydra.run.dir="], "hydra.run.dir=''", "must name a folder",
      done_when=True),
    C("run-dir-blank", ["hydra.run.dir=' '"], "hydra.run.dir=' '", "must name a folder"),
    C("run-dir-is-a-file", ["hydra.run.dir={files}/afile"], "hydra.run.dir={files}/afile",
      "is a file"),
    C("run-dir-under-a-file", ["hydra.run.dir={files}/afile/run"],
      "hydra.run.dir={files}/afile/run", "cannot be made"),
    C("run-dir-under-proc", ["hydra.run.dir=/proc/partition-run"],
      "hydra.run.dir=/proc/partition-run", "cannot be written"),
    C("run-dir-locked", ["hydra.run.dir={files}/locked/run"],
      "hydra.run.dir={files}/locked/run", "cannot be written", needs="locked"),
    C("run-dir-locked-itself", ["hydra.run.dir={files}/locked"],
      "hydra.run.dir={files}/locked", "cannot be written", needs="locked"),
    C("run-dir-read-only-mount", ["hydra.run.dir={files}/rofs/run"],
      "hydra.run.dir={files}/rofs/run", "Read-only file system", needs="rofs"),
    C("run-dir-another-run", ["hydra.run.dir={files}/other_run"],
      "hydra.run.dir={files}/other_run", "holds another run's result.json"),
    C("run-dir-torn-result", ["hydra.run.dir={files}/torn_run"],
      "hydra.run.dir={files}/torn_run", "holds another run's result.json"),
    C("sweep-dir-is-a-file", ["-m", "train.lr=0.1,0.2", "hydra.sweep.dir={files}/afile"],
      "hydra.sweep.dir={files}/afile", "is a file"),
    C("sweep-dir-locked", ["-m", "train.lr=0.1,0.2", "hydra.sweep.dir={files}/locked/sw"],
      "hydra.sweep.dir={files}/locked/sw", "cannot be written", needs="locked"),
    C("sweep-dir-read-only-mount", ["-m", "train.lr=0.1,0.2",
                                    "hydra.sweep.dir={files}/rofs/sw"],
      "hydra.sweep.dir={files}/rofs/sw", "Read-only file system", needs="rofs"),
    C("sweep-dir-under-proc", ["-m", "train.lr=0.1,0.2", "hydra.sweep.dir=/proc/sw"],
      "hydra.sweep.dir=/proc/sw", "cannot be written"),
    C("sweep-job-another-run", ["-m", "train.lr=0.1,0.2", "hydra.sweep.dir={files}/other_sweep"],
      "hydra.sweep.dir={files}/other_sweep/0_single", "job folder 0_single",
      "another run's result.json"),
    # ------------------------------------------------ flags (one unpickles its file)
    C("experimental-rerun", ["--experimental-rerun", "{files}/evil.pickle"],
      "--experimental-rerun", "unpickles", done_when=True),
    C("experimental-rerun-equals", ["--experimental-rerun={files}/evil.pickle"],
      "--experimental-rerun", "unpickles"),
    C("config-name-unknown", ["--config-name=nope"], "--config-name=nope", "there is: config",
      done_when=True),
    C("config-name-apart", ["--config-name", "nope"], "--config-name=nope"),
    C("config-name-short", ["-cn", "nope"], "--config-name=nope"),
    C("config-path", ["--config-path=/tmp"], "--config-path", "conf/ only"),
    C("config-dir", ["--config-dir=/tmp"], "--config-dir", "conf/ only"),
    C("flag-unknown", ["--bogus"], "--bogus", "no such option"),
    # ------------------------------------------------ keys that Hydra would let through
    C("plus-world-typo", ["+world_sise=4"], "+world_sise=4", "did you mean world_size?",
      done_when=True),
    C("plus-cost-typo", ["+cost.alpha=1"], "+cost.alpha=1", "did you mean cost.alpha_s?"),
    C("plus-model-typo", ["+model.dim=[6,5,3]"], "+model.dim=[6,5,3]", "model.dims"),
    C("plus-data-typo", ["+data.shufle=true"], "+data.shufle=true", "data.shuffle"),
    C("plus-fault-typo", ["+fault.kindd=raise"], "+fault.kindd=raise", "fault.kind"),
    C("plus-strategy-typo", ["+strategy.layuot=rowwise"], "+strategy.layuot=rowwise",
      "strategy.layout"),
    C("plus-unknown-section", ["+foo.bar=1"], "+foo.bar=1", "no such key"),
    C("plus-setting-as-section", ["+seed.x=1"], "+seed.x=1", "not a section"),
    C("plus-plus-typo", ["++train.lrr=0.1"], "++train.lrr=0.1", "train.lr"),
    C("plus-existing-key", ["+train.lr=0.2"], "+train.lr=0.2", "train.lr"),
    C("cost-key-unknown", ["cost.alpha=1"], "cost.alpha=1", "did you mean cost.alpha_s?"),
    C("key-close-match", ["train.batchsize=5"], "train.batchsize=5",
      "did you mean train.batch_size?"),
    C("top-level-close-match", ["world_sizes=2"], "world_sizes=2", "did you mean world_size?"),
    C("key-under-a-value", ["train.lr.x=1"], "train.lr.x=1", "no such key"),
    C("delete-lr", ["~train.lr"], "~train.lr", "cannot be deleted", done_when=True),
    C("delete-lr-with-value", ["~train.lr=0.1"], "~train.lr=0.1", "cannot be deleted"),
    C("delete-seed", ["~seed"], "~seed", "cannot be deleted"),
    C("delete-group", ["~model"], "~model", "cannot be deleted"),
    C("delete-section", ["~train"], "~train", "cannot be deleted"),
    C("comma-without-m", ["train.batch_size=64,128"], "train.batch_size=64,128", "-m",
      done_when=True),
    C("comma-strategy-without-m", ["strategy=single,pipeline"], "strategy=single,pipeline",
      "-m"),
    C("range-without-m", ["train.steps=range(2,4)"], "train.steps=range(2,4)", "-m"),
    C("choice-without-m", ["seed=choice(1,2)"], "seed=choice(1,2)", "-m"),
    C("group-empty", ["model="], "model=", "must be one of"),
    C("strategy-empty", ["strategy="], "strategy=", "must be one of"),
    C("experiment-unknown", ["+experiment=nope"], "experiment=nope", "compare"),
    C("interpolation-recursive", ["train.lr=${train.lr}"], "train.lr=${train.lr}",
      "Recursive"),
    C("override-unclosed-quote", ["train.lr='0.1"], "train.lr='0.1", "malformed"),
    # ------------------------------------------------ more than this machine can hold
    C("dims-huge-width", ["model.dims=[784,100000000000,10]"],
      "model.dims=[784,100000000000,10]", "bytes", "this machine has", done_when=True),
    C("dims-huge-input", ["model.dims=[100000000000,5,3]"], "model.dims=[100000000000,5,3]",
      "bytes"),
    C("num-examples-huge", ["data.num_examples=1000000000000"],
      "data.num_examples=1000000000000", "bytes", "synthetic dataset", done_when=True),
    C("teacher-huge", ["data.teacher_hidden=1000000000000"],
      "data.teacher_hidden=1000000000000", "bytes", "teacher"),
    C("batch-huge", ["train.batch_size=1000000000000"], "train.batch_size=1000000000000",
      "bytes", done_when=True),
    C("pipeline-huge", ["strategy=pipeline", "world_size=2", "model.dims=[784,100000000000,10]"],
      "model.dims=[784,100000000000,10]", "bytes"),
    C("sweep-with-one-huge-job", ["-m", "model.dims=[6,5,3],[784,100000000000,10]"],
      "model.dims=[784,100000000000,10]", "bytes"),
    # ------------------------------------------------ ranges
    C("seed-overflow", ["seed=100000000000000000000"], "seed=100000000000000000000",
      "between 0 and 4294967295", done_when=True),
    C("seed-2-to-the-32", ["seed=4294967296"], "seed=4294967296", "4294967295"),
    C("seed-fraction", ["seed=1.5"], "seed=1.5", "integer"),
    C("seed-word", ["seed=abc"], "seed=abc", "integer"),
    C("timeout-huge", ["timeout_s=1e15"], "timeout_s=", "between 1 s and 604800 s",
      done_when=True),
    C("timeout-tiny", ["timeout_s=0.000001"], "timeout_s=1e-06", "between 1 s"),
    C("timeout-over-a-week", ["timeout_s=604801"], "timeout_s=604801", "604800"),
    C("timeout-negative", ["timeout_s=-5"], "timeout_s=-5", "> 0"),
    C("timeout-nan", ["timeout_s=nan"], "timeout_s=nan", "finite"),
    C("timeout-inf", ["timeout_s=inf"], "timeout_s=inf", "finite"),
    C("timeout-word", ["timeout_s=soon"], "timeout_s=soon", "number"),
    C("memory-half-byte", ["memory_limit=0.5"], "memory_limit=0.5", "at least 1 byte",
      done_when=True),
    C("memory-tenth-byte-unit", ["memory_limit=0.1B"], "memory_limit=0.1B", "at least 1 byte"),
    C("memory-zero", ["memory_limit=0"], "memory_limit=0", "positive"),
    C("memory-huge", ["memory_limit=1e30"], "memory_limit=", "at most"),
    C("memory-inf", ["memory_limit=inf"], "memory_limit=inf"),
    C("memory-bool", ["memory_limit=true"], "memory_limit=True", "byte count"),
    C("num-examples-zero", ["data.num_examples=0"], "data.num_examples=0", ">= 1"),
    C("num-examples-fraction", ["data.num_examples=2.5"], "data.num_examples=2.5", "integer"),
    C("teacher-zero", ["data.teacher_hidden=0"], "data.teacher_hidden=0", ">= 1"),
    C("warmup-equals-steps", ["train.warmup_steps=2"], "train.warmup_steps=2",
      "train.steps=2", done_when=True),
    C("warmup-more-than-steps", ["train.warmup_steps=5"], "train.warmup_steps=5", "< train.steps"),
    C("warmup-negative", ["train.warmup_steps=-1"], "train.warmup_steps=-1", ">= 0"),
    C("warmup-fraction", ["train.warmup_steps=0.5"], "train.warmup_steps=0.5", "integer"),
    C("batch-fraction", ["train.batch_size=8.5"], "train.batch_size=8.5", "integer"),
    C("batch-word", ["train.batch_size=big"], "train.batch_size=big", "integer"),
    C("microbatches-negative", ["train.microbatches=-2"], "train.microbatches=-2", ">= 1"),
    C("microbatches-more-than-batch", ["train.microbatches=16"], "train.microbatches=16",
      "train.batch_size=8"),
    C("steps-negative", ["train.steps=-1"], "train.steps=-1", ">= 1"),
    C("steps-fraction", ["train.steps=2.5"], "train.steps=2.5", "integer"),
    C("momentum-negative", ["train.momentum=-0.5"], "train.momentum=-0.5", ">= 0"),
    C("momentum-one", ["train.momentum=1"], "train.momentum=1", "< 1"),
    C("decay-nan", ["model.weight_decay=nan"], "model.weight_decay=nan", "finite"),
    C("lr-inf", ["train.lr=inf"], "train.lr=inf", "finite"),
    C("dims-negative", ["model.dims=[6,-5,3]"], "model.dims=[6,-5,3]", ">= 1"),
    C("dims-fraction", ["model.dims=[6,5.5,3]"], "model.dims=", "integer"),
    C("dims-word-entry", ["model.dims=[6,a,3]"], "model.dims=", "integer"),
    C("dims-nested", ["model.dims=[[6],5,3]"], "model.dims=", "integer"),
    C("world-word", ["world_size=two"], "world_size=two", "integer"),
    C("balance-zero", ["strategy=pipeline", "world_size=2", "strategy.balance=[0,2]"],
      "strategy.balance=[0,2]", ">= 1"),
    C("balance-not-a-list", ["strategy=pipeline", "world_size=2", "strategy.balance=2"],
      "strategy.balance=2", "list"),
    C("tensor-ranks-over-units", ["strategy=tensor", "world_size=6"], "world_size=6",
      "at least one unit"),
    C("data-ranks-over-rows", ["strategy=data", "world_size=9"], "train.batch_size=8",
      "at least one example per rank"),
    C("data-microbatches-too-many", ["strategy=data", "world_size=2", "train.microbatches=8"],
      "train.microbatches=8", "data parallel"),
    C("torch-1f1b-few-microbatches", ["engine=torch", "strategy=pipeline", "world_size=2",
                                      "strategy.schedule=1f1b"], "train.microbatches=1",
      "Schedule1F1B"),
    C("torch-megatron-uneven", ["engine=torch", "strategy=tensor", "world_size=2"],
      "model.dims=[6,5,3]", "divisible by world_size=2"),
    C("torch-hybrid-ddp-zero-bubble", ["engine=torch", "strategy=hybrid", "world_size=4",
                                       "strategy.dp=2", "strategy.pp=2", "strategy.schedule=zb1p"],
      "strategy.schedule=zb1p", "DDP", "engine=explicit"),
    C("fault-rank-negative", ["fault.rank=-1", "fault.step=0", "fault.kind=raise"],
      "fault.rank=-1", ">= 0"),
    C("fault-step-negative", ["fault.rank=0", "fault.step=-1", "fault.kind=raise"],
      "fault.step=-1", ">= 0"),
    C("engine-unknown", ["engine=jax"], "engine=jax", "explicit"),
    C("grad-check-not-a-bool", ["train.grad_check=maybe"], "train.grad_check=maybe",
      "true or false"),
    C("shuffle-not-a-bool", ["data.shuffle=2"], "data.shuffle=2", "true or false"),
    C("probe-not-a-bool", ["memory_probe=yes"], "memory_probe=yes", "true or false"),
    C("cost-alpha-negative", ["cost.alpha_s=-1"], "cost.alpha_s=-1", ">= 0"),
    C("cost-beta-zero", ["cost.beta_Bps=0"], "cost.beta_Bps=0", "> 0"),
    C("cost-rate-word", ["cost.flops_per_s=fast"], "cost.flops_per_s=fast", "number"),
    C("cost-calibrate-not-a-bool", ["cost.calibrate=sometimes"], "cost.calibrate=sometimes",
      "true or false"),
    C("dtype-integer", ["train.dtype=int64"], "train.dtype=int64", "float64"),
    C("activation-empty", ["model.activation="], "model.activation=''", "relu"),
    C("loss-empty", ["model.loss="], "model.loss=''", "squared_error"),
    C("decay-word", ["model.weight_decay=lots"], "model.weight_decay=lots", "number"),
    C("num-examples-word", ["data.num_examples=many"], "data.num_examples=many", "integer"),
    C("digits-wrong-widths", ["data=digits"], "data=digits"),
    # ------------------------------------------------ settings without their switch
    C("init-path-without-file", ["model.init_path={files}/init_shape.npz"],
      "model.init_path={files}/init_shape.npz", "model.init=file", done_when=True),
    C("data-path-without-npz", ["data.path={files}/nan.npz"], "data.path={files}/nan.npz",
      "data=npz", done_when=True),
    C("fault-rank-without-kind", ["fault.rank=0"], "fault.rank=0", "fault.kind"),
    C("fault-step-without-kind", ["fault.step=1"], "fault.step=1", "fault.kind"),
    C("fault-both-without-kind", ["fault.rank=0", "fault.step=1"], "fault.rank=0",
      "fault.kind", done_when=True),
    C("fault-off-with-rank", ["fault.kind=off", "fault.rank=0", "fault.step=0"],
      "fault.rank=0", "fault.kind"),
    C("schedule-with-tensor", ["strategy=tensor", "world_size=2", "strategy.schedule=1f1b"],
      "strategy.schedule=1f1b", "strategy=pipeline", done_when=True),
    C("schedule-with-single", ["strategy.schedule=1f1b"], "strategy.schedule=1f1b",
      "strategy=pipeline"),
    C("balance-with-data", ["strategy=data", "world_size=2", "strategy.balance=[1,1]"],
      "strategy.balance=[1,1]", "strategy=pipeline"),
    C("layout-with-pipeline", ["strategy=pipeline", "world_size=2", "strategy.layout=rowwise"],
      "strategy.layout=rowwise", "strategy=tensor"),
    C("precheck-without-limit", ["cost.precheck=true"], "cost.precheck=True",
      "memory_limit"),
    C("sweep-with-a-switchless-job", ["-m", "fault.rank=0,null"], "fault.rank=0",
      "fault.kind"),
    # ------------------------------------------------ files: members, dtypes, shapes
    C("data-member-not-npy", NPZ + ["data.path={files}/raw_member.npz"],
      "data.path={files}/raw_member.npz", "member X is not a .npy array", done_when=True),
    C("data-y-member-not-npy", NPZ + ["data.path={files}/raw_y.npz"],
      "data.path={files}/raw_y.npz", "member y is not a .npy array"),
    C("init-member-not-npy", INIT + ["model.init_path={files}/init_raw.npz"],
      "model.init_path={files}/init_raw.npz", "is not a .npy array"),
    C("data-corrupt-member", NPZ + ["data.path={files}/corrupt_member.npz"],
      "data.path={files}/corrupt_member.npz", "not a readable .npz"),
    C("data-empty-zip", NPZ + ["data.path={files}/empty.npz"], "data.path={files}/empty.npz",
      "missing array(s) X, y"),
    C("data-complex", NPZ + ["data.path={files}/complex.npz"], "data.path={files}/complex.npz",
      "complex128", done_when=True),
    C("data-complex-targets", NPZ + SQ + ["data.path={files}/complex_y.npz"],
      "data.path={files}/complex_y.npz", "y has dtype complex128"),
    C("data-timedelta", NPZ + ["data.path={files}/timedelta.npz"],
      "data.path={files}/timedelta.npz", "timedelta64", done_when=True),
    C("data-timedelta-labels", NPZ + ["data.path={files}/timedelta_y.npz"],
      "data.path={files}/timedelta_y.npz", "class indices"),
    C("data-datetime", NPZ + ["data.path={files}/datetime.npz"],
      "data.path={files}/datetime.npz", "datetime64"),
    C("data-bool", NPZ + ["data.path={files}/bool.npz"], "data.path={files}/bool.npz",
      "dtype bool"),
    C("data-strings", NPZ + ["data.path={files}/strings.npz"], "data.path={files}/strings.npz",
      "real numbers"),
    C("data-no-rows", NPZ + ["data.path={files}/norows.npz"], "data.path={files}/norows.npz",
      "no rows"),
    C("data-one-dimensional", NPZ + ["data.path={files}/flat.npz"],
      "data.path={files}/flat.npz", "expected (N, 6)"),
    C("data-y-short", NPZ + ["data.path={files}/shorty.npz"], "data.path={files}/shorty.npz",
      "(64,) class indices"),
    C("data-inf", NPZ + ["data.path={files}/inf.npz"], "data.path={files}/inf.npz",
      "infinite"),
    C("data-labels-for-squared-error", NPZ + SQ + ["data.path={files}/nan.npz".replace(
        "nan", "labels_ok")], "data.path={files}/labels_ok.npz", "expected (64, 3) targets"),
    C("data-path-empty", NPZ + ["data.path="], "data.path", "data=npz"),
    C("init-complex", INIT + ["model.init_path={files}/init_complex.npz"],
      "model.init_path={files}/init_complex.npz", "W1 has dtype complex128"),
    C("init-timedelta", INIT + ["model.init_path={files}/init_timedelta.npz"],
      "model.init_path={files}/init_timedelta.npz", "timedelta64"),
    C("init-extra-array", INIT + ["model.init_path={files}/init_extra.npz"],
      "model.init_path={files}/init_extra.npz", "do not match"),
    C("init-inf", INIT + ["model.init_path={files}/init_inf.npz"],
      "model.init_path={files}/init_inf.npz", "infinite"),
    C("init-not-npz", INIT + ["model.init_path={files}/garbage.npz"],
      "model.init_path={files}/garbage.npz", "not an .npz"),
    C("init-is-a-folder", INIT + ["model.init_path={files}"], "model.init_path={files}",
      "no such file"),
    C("init-without-biases", INIT + ["model.bias=true", "model.init_path={files}/init_ok.npz"],
      "model.init_path={files}/init_ok.npz", "b1"),
    C("init-path-empty", INIT + ["model.init_path="], "model.init_path", "model.init=file"),
]

assert len(CATALOGUE) >= 150 and len({c.id for c in CATALOGUE}) == len(CATALOGUE)


def _make_files(d: str) -> None:
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 6)), rng.integers(0, 3, 64)
    Xn = X.copy()
    Xn[3, 2] = np.nan
    np.savez(f"{d}/nan.npz", X=Xn, y=y)
    np.savez(f"{d}/labels.npz", X=X, y=np.where(np.arange(64) == 5, 7, y))
    np.savez(f"{d}/neglabels.npz", X=X, y=np.where(np.arange(64) == 5, -1, y))
    np.savez(f"{d}/floatlabels.npz", X=X, y=y.astype(np.float64))
    np.savez(f"{d}/width.npz", X=X[:, :5], y=y)
    np.savez(f"{d}/noy.npz", X=X)
    np.savez(f"{d}/pickled.npz", X=np.array([{"evil": 1}] * 64, dtype=object), y=y)
    with open(f"{d}/garbage.npz", "wb") as fh:
        fh.write(b"this is not a zip file")
    np.savez(f"{d}/init_shape.npz", W1=np.zeros((4, 6)), W2=np.zeros((3, 5)))
    np.savez(f"{d}/init_missing.npz", W1=np.zeros((5, 6)))
    np.savez(f"{d}/init_nan.npz", W1=np.full((5, 6), np.nan), W2=np.zeros((3, 5)))
    np.savez(f"{d}/init_pickled.npz", W1=np.array([None] * 30, dtype=object).reshape(5, 6),
             W2=np.zeros((3, 5)))
    _make_issue19_files(d, X, y)


class _Evil:
    """Unpickling this creates `marker`: a stand-in for code a crafted pickle would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def _zip(path: str, members: dict[str, bytes]) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _make_issue19_files(d: str, X: np.ndarray, y: np.ndarray) -> None:
    import json
    import pickle

    with open(f"{d}/afile", "w") as fh:
        fh.write("a file where a folder should be\n")
    for folder in ("locked", "rofs", "other_run", "torn_run", "other_sweep/0_single"):
        os.makedirs(f"{d}/{folder}", exist_ok=True)
    for where in ("other_run", "other_sweep/0_single"):
        with open(f"{d}/{where}/result.json", "w") as fh:
            json.dump({"status": "ok", "config": {"seed": 12345}}, fh)
    with open(f"{d}/torn_run/result.json", "w") as fh:
        fh.write('{"status": "ok", "conf')
    with open(f"{d}/evil.pickle", "wb") as fh:
        pickle.dump(_Evil(f"{d}/PICKLE_RAN"), fh)
    # np.load hands back the raw bytes of a member that is not "<name>.npy".
    _zip(f"{d}/raw_member.npz", {"X": b"not an array", "y.npy": _npy(y)})
    _zip(f"{d}/raw_y.npz", {"X.npy": _npy(X), "y": b"not an array"})
    _zip(f"{d}/init_raw.npz", {"W1": b"not an array", "W2.npy": _npy(np.zeros((3, 5)))})
    _zip(f"{d}/corrupt_member.npz", {"X.npy": b"\x93NUMPY garbage", "y.npy": _npy(y)})
    _zip(f"{d}/empty.npz", {})
    np.savez(f"{d}/complex.npz", X=X + 1j, y=y)
    np.savez(f"{d}/complex_y.npz", X=X, y=np.zeros((64, 3)) + 1j)
    np.savez(f"{d}/timedelta.npz", X=X.astype("timedelta64[s]"), y=y)
    np.savez(f"{d}/timedelta_y.npz", X=X, y=y.astype("timedelta64[s]"))
    np.savez(f"{d}/datetime.npz", X=X.astype("datetime64[s]"), y=y)
    np.savez(f"{d}/bool.npz", X=X > 0, y=y)
    np.savez(f"{d}/strings.npz", X=X.astype(str), y=y)
    np.savez(f"{d}/norows.npz", X=np.zeros((0, 6)), y=np.zeros(0, dtype=int))
    np.savez(f"{d}/flat.npz", X=X[:, 0], y=y)
    np.savez(f"{d}/shorty.npz", X=X, y=y[:63])
    Xi = X.copy()
    Xi[0, 0] = np.inf
    np.savez(f"{d}/inf.npz", X=Xi, y=y)
    np.savez(f"{d}/labels_ok.npz", X=X, y=y)
    np.savez(f"{d}/init_ok.npz", W1=np.zeros((5, 6)), W2=np.zeros((3, 5)))
    np.savez(f"{d}/init_complex.npz", W1=np.zeros((5, 6)) + 1j, W2=np.zeros((3, 5)))
    np.savez(f"{d}/init_timedelta.npz", W1=np.zeros((5, 6)).astype("timedelta64[s]"),
             W2=np.zeros((3, 5)))
    np.savez(f"{d}/init_extra.npz", W1=np.zeros((5, 6)), W2=np.zeros((3, 5)),
             W3=np.zeros((3, 3)))
    np.savez(f"{d}/init_inf.npz", W1=np.full((5, 6), np.inf), W2=np.zeros((3, 5)))


def _lock(folder: str) -> bool:
    """Make `folder` unwritable for this process: chmod for a user, chattr +i for root (whom
    modes do not stop). False when neither works."""
    import subprocess

    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return True
    return subprocess.run(["chattr", "+i", folder], capture_output=True).returncode == 0


def _unlock(folder: str) -> None:
    import subprocess

    if os.geteuid() != 0:
        os.chmod(folder, 0o755)
    else:
        subprocess.run(["chattr", "-i", folder], capture_output=True)


def _private_mounts() -> bool:
    """Whether `unshare -m` can give a command its own mount namespace (for a read-only
    mount nobody else sees)."""
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def files(tmp_path_factory):  # noqa: ANN201
    d = str(tmp_path_factory.mktemp("bad-files"))
    _make_files(d)
    locked = _lock(f"{d}/locked")
    yield d
    if locked:
        _unlock(f"{d}/locked")


def _skip_unless_possible(case: Case, files: str, *, subprocess_run: bool) -> None:
    if case.needs == "no-cuda" and torch.cuda.is_available():
        pytest.skip("device=cuda is fine on this machine")
    if case.needs == "locked" and os.access(f"{files}/locked", os.W_OK) and \
            "i" not in _attrs(f"{files}/locked"):
        pytest.skip("cannot make a folder unwritable here")
    if case.needs == "rofs" and (not subprocess_run or not _private_mounts()):
        pytest.skip("a read-only mount needs a private mount namespace (unshare -m): "
                    "checked on the command line only")


def _attrs(path: str) -> str:
    p = subprocess.run(["lsattr", "-d", path], capture_output=True, text=True)
    return p.stdout.split()[0] if p.returncode == 0 and p.stdout else ""


def _snapshot(folder: str) -> dict[str, tuple[int, float]]:
    """Every file under `folder` with its size and mtime: a refusal changes none of them."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime)
    return out


def check_refusal(case: Case, files: str, code: int | None, stderr: str, stdout: str,
                  left: list[str]) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, f"exit status {code}; stderr: {stderr!r}"
    assert len(lines) == 1, f"want one line, got: {stderr!r}"
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in stderr
    for part in case.expected(files):
        assert part in line, f"{part!r} not in {line!r}"
    assert stdout.strip() == "", stdout
    assert left == [], f"left behind: {left}"


# ---------------------------------------------------------------- in this process


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_refused(case, files, tmp_path, monkeypatch, capsys):
    from experiments.run import main

    _skip_unless_possible(case, files, subprocess_run=False)
    before = _snapshot(files)
    monkeypatch.chdir(tmp_path)  # outputs/ would appear here
    monkeypatch.setattr(sys, "argv", ["experiments.run", *case.argv(files)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    check_refusal(case, files, exc.value.code, out.err, out.out, os.listdir(tmp_path))
    assert _snapshot(files) == before  # nothing written anywhere, no pickle run


def test_the_catalogue_is_counted_where_it_is_stated():
    """The number the docs give is this list's length, so it cannot go stale."""
    import re

    stated = {}
    for doc in ("README.md", "docs/reliability.md"):
        with open(os.path.join(ROOT, doc)) as fh:
            stated[doc] = [int(n) for n in re.findall(r"catalogue\s+\((\d+) cases\)", fh.read())]
    assert stated == {doc: [len(CATALOGUE)] for doc in stated}


# ---------------------------------------------------------------- the real command line


def _cli(argv: list[str], *, torchrun: bool = False,
         read_only: str | None = None) -> tuple[int, str, str, list[str]]:
    """Run the command in a fresh empty folder; (status, stdout, stderr, what it left there).
    `read_only`: a folder to mount a read-only tmpfs on, for this command only."""
    import tempfile

    cwd = tempfile.mkdtemp(prefix="bad-input-")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun
           else [sys.executable]) + ["-m", "experiments.run", *argv]
    if read_only:
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', read_only, *cmd]
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        return p.returncode, p.stdout, p.stderr, os.listdir(cwd)
    finally:
        shutil.rmtree(cwd, ignore_errors=True)


def _cli_case(case: Case, files: str) -> tuple[int, str, str, list[str]]:
    read_only = f"{files}/rofs" if case.needs == "rofs" else None
    return _cli(case.argv(files), read_only=read_only)


def _cli_all(cases: list[Case], files: str) -> dict[str, tuple[int, str, str, list[str]]]:
    # Each start costs seconds (torch, Hydra): several at once.
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip([c.id for c in cases],
                        pool.map(lambda c: _cli_case(c, files), cases), strict=True))


DONE_WHEN = [c for c in CATALOGUE if c.done_when]
# A start costs seconds: the default suite starts one per kind of refusal (a value, a
# choice, a file, a unit, a run folder, a flag, memory); `-m slow` starts every case.
FIRST = {"batch-zero", "strategy-unknown", "data-missing-file", "memory-lots",
         "run-dir-read-only-mount", "experimental-rerun", "dims-huge-width", "delete-lr"}
DONE_WHEN_FIRST = [c for c in CATALOGUE if c.id in FIRST]


@pytest.fixture(scope="module")
def done_when_runs(files):
    return _cli_all(DONE_WHEN_FIRST, files)


@pytest.mark.parametrize("case", DONE_WHEN_FIRST, ids=[c.id for c in DONE_WHEN_FIRST])
def test_refused_by_the_command_line(case, files, done_when_runs):
    _skip_unless_possible(case, files, subprocess_run=True)
    code, out, err, left = done_when_runs[case.id]
    check_refusal(case, files, code, err, out, left)
    assert not os.path.exists(f"{files}/PICKLE_RAN")


@pytest.fixture(scope="module")
def all_runs(files):
    return _cli_all(CATALOGUE, files)


@pytest.mark.slow
@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_refused_by_the_command_line_every_case(case, files, all_runs):
    _skip_unless_possible(case, files, subprocess_run=True)
    code, out, err, left = all_runs[case.id]
    check_refusal(case, files, code, err, out, left)
    assert not os.path.exists(f"{files}/PICKLE_RAN")


def test_torchrun_world_size_disagrees():
    """torchrun starts 2 processes for world_size=3: one line from the ranks, no rank traceback.

    torchrun itself then prints its own ChildFailedError report (the agent's, not a rank's).
    """
    code, out, err, left = _cli(["world_size=3", "strategy=pipeline", "model.dims=[6,5,4,3]",
                                 "device=cpu"], torchrun=True)
    assert code != 0
    ours = [line for line in (out + err).splitlines() if line.startswith("error: ")]
    assert ours == ["error: world_size=3: torchrun started 2 processes; set world_size=2"], err
    # The only traceback is the torchrun agent's own report; none comes from a rank's code.
    assert "experiments/" not in err and "partition/" not in err, err
    assert left == []


@pytest.mark.slow
def test_torchrun_refuses_flags():
    """Under torchrun a flag would be dropped (or, --experimental-rerun, its FILE read as an
    override): one line instead."""
    code, out, err, left = _cli(["--experimental-rerun", "x.pickle", "device=cpu"],
                                torchrun=True)
    assert code != 0
    ours = [line for line in (out + err).splitlines() if line.startswith("error: ")]
    assert ours == ["error: --experimental-rerun: flags are not read under torchrun (each "
                    "sweep job starts its own ranks: run -m without torchrun); give overrides "
                    "only"], err
    assert left == []
