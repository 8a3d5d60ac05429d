"""The run's configuration as validated, typed dataclasses.

The library never reads Hydra: `experiments/` hands a plain dict (the resolved
Hydra config) to `parse_config`, which checks every key a run relies on and
raises `ConfigError` naming the key and the offending value. That is what lets a
bad input end in one line and exit status 2 before any rank starts.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from partition.model import ACTIVATIONS, LOSSES, MLPSpec
from partition.plans.fsdp import ZERO_STAGES

if TYPE_CHECKING:
    from partition.plans.schedule import Schedule

STRATEGIES = ("single", "pipeline", "tensor", "data", "fsdp", "hybrid")
# or the path of a compute-only .csv (plans/schedule.py); the last five in plans/generators.py
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "zb1p", "zbv", "dualpipev")
LAYOUTS = ("megatron", "rowwise")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("explicit", "torch")
DTYPES = ("float32", "float64")
RECOMPUTE = ("none", "full")
# The compute precision of forward and backward; train.dtype stays the master weights' storage.
PRECISIONS = ("fp32", "bf16", "fp64")
# The policies that make sense (docs/one-device.md): each storage dtype computes in its own
# precision, and float32 masters may compute in bfloat16 (mixed precision).
PRECISION_DTYPES = {"fp32": ("float32",), "bf16": ("float32",), "fp64": ("float64",)}
OWN_PRECISION = {"float32": "fp32", "float64": "fp64"}
OPTIMIZERS = ("sgd", "adam", "adamw")
DATASETS = ("synthetic", "npz", "digits")
INITS = ("seeded", "file")
FAULT_KINDS = ("raise", "exit", "hang")


class ConfigError(ValueError):
    """A bad configuration value: `key`, the `value` given, and why it is refused."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={_show(value)}: {reason}")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value if value and not value.isspace() else repr(value)
    return str(value).replace(" ", "")


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "single"
    schedule: str = "gpipe"  # pipeline: one of SCHEDULES | path to a .csv of per-rank actions
    # pipeline: stages per rank (P·v stages in all). None in the config = the schedule's own
    # (1; 2 for interleaved_1f1b, looped_bfs, zbv, dualpipev); resolved here for a named
    # schedule; a .csv says itself which rank holds which stage.
    virtual_stages: int | None = None
    # pipeline: params (None) | flops | time | layers per stage (plans/stages.py)
    balance: tuple[int, ...] | str | None = None
    layout: str = "megatron"  # tensor: megatron | rowwise
    zero_stage: int = 3  # fsdp: 1 | 2 | 3 (what is sharded: optimizer; + grads; + params)
    reshard_after_forward: bool = True  # fsdp stage 3, hybrid dp_shard: free gathered weights after forward
    # hybrid: the mesh's sizes (plans/mesh.py); dp=auto is world_size ÷ (pp·tp)
    dp: int | str = "auto"
    pp: int = 1
    tp: int = 1
    dp_shard: bool = False  # hybrid: the data dimension as fsdp stage 3 (else plain data)


@dataclass(frozen=True)
class ModelConfig:
    dims: tuple[int, ...] = (784, 256, 10)
    activation: str = "relu"
    loss: str = "cross_entropy"
    bias: bool = False
    weight_decay: float = 0.0
    init: str = "seeded"
    init_path: str | None = None

    def spec(self) -> MLPSpec:
        return MLPSpec(self.dims, self.activation, self.loss, self.bias, self.weight_decay)


@dataclass(frozen=True)
class DataConfig:
    name: str = "synthetic"
    path: str | None = None
    shuffle: bool = False
    num_examples: int = 4096  # synthetic only
    teacher_hidden: int = 32  # synthetic only: width of the random teacher net


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 256
    microbatches: int = 1
    steps: int = 10
    lr: float = 0.1
    momentum: float = 0.0
    dtype: str = "float32"
    warmup_steps: int = 1  # excluded from step-time and steady-state figures
    grad_check: bool = True  # compare step 0's gradients with a float64 autograd reference
    recompute: str = "none"  # none | full: keep each micro-batch's stage input only, redo z, h
    precision: str = "fp32"  # fp32 | bf16 | fp64: what forward/backward compute in
    optimizer: str = "sgd"  # sgd (train.momentum) | adam (λ as L2) | adamw (λ decoupled)
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw: β₁, β₂
    eps: float = 1e-8  # adam/adamw: ε


@dataclass(frozen=True)
class FaultConfig:
    rank: int | None = None
    step: int | None = None
    kind: str | None = None

    @property
    def enabled(self) -> bool:
        return self.kind is not None


@dataclass(frozen=True)
class CostConfig:
    """The analytic model's machine: α + n/β per message, a compute rate (docs/cost-model.md).

    Defaults are what a 2-core CPU box with loopback gloo showed; `calibrate` measures
    them at start-up instead (a short micro-benchmark, recorded in result.json).
    """

    alpha_s: float = 55e-6  # point-to-point latency per message
    beta_Bps: float = 5e9  # point-to-point bandwidth, bytes/s
    collective_alpha_s: float = 230e-6  # latency per collective call
    collective_beta_Bps: float = 2.6e9  # collective bandwidth, wire bytes/s
    flops_per_s: float = 115e9  # matmul rate of one device (one core, float32)
    calibrate: bool = False
    precheck: bool = False  # refuse a run whose predicted peak exceeds memory_limit, up front
    profile: str | None = None  # a result.json whose ranks' calibration the simulator reuses


@dataclass(frozen=True)
class TraceConfig:
    """Which steps record a timeline (trace.json, timeline.png), and torch.profiler's too."""

    steps: str | tuple[int, ...] = "last"  # last (the last steady step) | all | [steps]
    profiler: bool = False  # also run a step under torch.profiler and export its trace


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    world_size: int = 1
    device: str = "auto"
    memory_limit: int | None = None
    engine: str = "explicit"
    timeout_s: float = 60.0
    seed: int = 0
    memory_probe: bool = True
    threads_per_rank: int | None = None  # intra-op threads of one rank; None = 1 on CPU

    @property
    def spec(self) -> MLPSpec:
        return self.model.spec()

    @property
    def ranks(self) -> int:
        """How many ranks actually run: `single` is one device whatever world_size says."""
        return 1 if self.strategy.name == "single" else self.world_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- value checks


def _get(d: dict[str, Any], key: str, default: Any) -> Any:
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _int(key: str, v: Any, *, min_value: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ConfigError(key, v, "must be an integer")
    try:
        f = float(v)
    except ValueError:
        raise ConfigError(key, v, "must be an integer") from None
    if not math.isfinite(f) or f != int(f):
        raise ConfigError(key, v, "must be an integer")
    i = int(f)
    if min_value is not None and i < min_value:
        raise ConfigError(key, v, f"must be >= {min_value}")
    return i


def _float(key: str, v: Any, *, positive: bool = False, non_negative: bool = False) -> float:
    if isinstance(v, bool):
        raise ConfigError(key, v, "must be a number")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(key, v, "must be a number") from None
    if not math.isfinite(f):
        raise ConfigError(key, v, "must be a finite number")
    if positive and f <= 0:
        raise ConfigError(key, v, "must be > 0")
    if non_negative and f < 0:
        raise ConfigError(key, v, "must be >= 0")
    return f


# timeout_s: a peer gets at least a second (a step can take that on a busy machine), and
# at most a week (timedelta and faulthandler overflow long before 1e15 s).
TIMEOUT_RANGE_S = (1.0, 7 * 24 * 3600.0)
SEED_RANGE = (0, 2**32 - 1)


def _in_range(key: str, raw: Any, v: float, lo: float, hi: float, *, why: str,
              unit: str = "") -> Any:
    """`v` (parsed from `raw`, which the message shows as given) within [lo, hi]."""
    if not lo <= v <= hi:
        raise ConfigError(key, raw, f"must be between {lo:g}{unit} and {hi:g}{unit} ({why})"
                          if isinstance(v, float) else f"must be between {lo} and {hi} ({why})")
    return v


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise ConfigError(key, v, "must be true or false")


def _choice(key: str, v: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(key, v, f"must be one of {', '.join(choices)}")
    return v


def _int_list(key: str, v: Any, *, min_len: int, min_value: int) -> tuple[int, ...]:
    if isinstance(v, (str, int, float)) or v is None:
        raise ConfigError(key, v, "must be a list of integers, e.g. [784,256,10]")
    items = tuple(_int(key, x) for x in v)
    if len(items) < min_len:
        raise ConfigError(key, list(items), f"needs at least {min_len} entries")
    if any(x < min_value for x in items):
        raise ConfigError(key, list(items), f"entries must be >= {min_value}")
    return items


MAX_BYTES = 2**60
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_bytes(key: str, v: Any) -> int | None:
    """`memory_limit`: null, a byte count, or a string such as "64MiB" or "1.5GB"."""
    if v is None or (isinstance(v, str) and v.lower() in ("null", "none", "")):
        return None
    if isinstance(v, bool):
        raise ConfigError(key, v, "must be a byte count such as 67108864 or \"64MiB\"")
    if isinstance(v, (int, float)):
        n = float(v)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(v))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(key, v, "must be a byte count such as 67108864 or \"64MiB\"")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(n) or n <= 0:
        raise ConfigError(key, v, "must be a positive byte count")
    if n < 1:  # int() would make it a limit of 0 bytes
        raise ConfigError(key, v, "must be at least 1 byte")
    if n > MAX_BYTES:
        raise ConfigError(key, v, f"must be at most {MAX_BYTES:,} bytes (1 EiB)")
    return int(n)


def _zero_stage(v: Any) -> int:
    stage = _int("strategy.zero_stage", v)
    if stage not in ZERO_STAGES:
        raise ConfigError("strategy.zero_stage", v,
                          f"must be one of {', '.join(map(str, ZERO_STAGES))}")
    return stage


# ---------------------------------------------------------------- the parser


# The config's sections and the keys each may hold (a group's `name` picks the option).
_SECTIONS = {"model": ModelConfig, "strategy": StrategyConfig, "data": DataConfig,
             "train": TrainConfig, "fault": FaultConfig, "cost": CostConfig, "trace": TraceConfig}


def schema() -> dict[str, tuple[str, ...] | None]:
    """The project's own keys: each section with its keys, and each top-level setting
    (None). What a `+key=value` on the command line may add to, and nothing else."""
    out: dict[str, tuple[str, ...] | None] = {f.name: None for f in fields(RunConfig)
                                               if f.name not in _SECTIONS}
    out.update({name: tuple(f.name for f in fields(cls)) for name, cls in _SECTIONS.items()})
    return out


def close_match(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The likeliest intended spelling of `word` among `choices` (a typo's fix), if any."""
    import difflib

    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_key_reason(section: str | None, key: str) -> str:
    """'no such key; did you mean …?' for `key` in `section` (None: the top level)."""
    keys = schema()
    if section is None:
        match = close_match(key, list(keys))
        return f"no such key (did you mean {match}?)" if match else "no such key"
    known = keys.get(section) or ()
    match = close_match(key, known)
    if match:
        return f"no such key (did you mean {section}.{match}?)"
    return f"no such key; {section} has {', '.join(sorted(known))}"


def _check_sections(d: dict[str, Any]) -> None:
    """A section must be a mapping of known keys: `train=5`, or `+train.lrr=0.1` (a typo
    that Hydra lets through with `+`), would otherwise be silently ignored.

    Keys outside these sections are left to whoever owns them (tools add their own).
    """
    for name, cls in _SECTIONS.items():
        node = d.get(name)
        if node is None or (isinstance(node, str) and name in ("strategy", "data")):
            continue  # absent (defaults), or a bare group choice such as strategy="pipeline"
        known = sorted(f.name for f in fields(cls))
        if not isinstance(node, dict):
            raise ConfigError(name, node, f"must be a group of keys ({', '.join(known)})")
        unknown = sorted(set(node) - set(known))
        if unknown:
            raise ConfigError(f"{name}.{unknown[0]}", node[unknown[0]],
                              unknown_key_reason(name, unknown[0]))


def parse_config(d: dict[str, Any]) -> RunConfig:
    """Validate a resolved config dict (Hydra's, or a test's) into a RunConfig."""
    if not isinstance(d, dict):
        raise ConfigError("config", type(d).__name__, "must be a mapping of keys")
    _check_sections(d)
    strategy_node = _get(d, "strategy", "single")
    sname = strategy_node if isinstance(strategy_node, str) else _get(d, "strategy.name", "single")
    name = _choice("strategy", sname, STRATEGIES)
    balance_raw = _get(d, "strategy.balance", None) if isinstance(strategy_node, dict) else None
    schedule = _schedule(_get(d, "strategy.schedule", "gpipe"))
    strategy = StrategyConfig(
        name=name,
        schedule=schedule,
        virtual_stages=_virtual(schedule, _get(d, "strategy.virtual_stages", None),
                                resolve=name in ("pipeline", "hybrid")),
        balance=_balance(balance_raw),
        layout=_choice("strategy.layout", _get(d, "strategy.layout", "megatron"), LAYOUTS),
        zero_stage=_zero_stage(_get(d, "strategy.zero_stage", 3)),
        reshard_after_forward=_bool("strategy.reshard_after_forward",
                                    _get(d, "strategy.reshard_after_forward", True)),
        dp=_mesh_size("strategy.dp", _get(d, "strategy.dp", "auto"), auto=True),
        pp=_mesh_size("strategy.pp", _get(d, "strategy.pp", 1)),
        tp=_mesh_size("strategy.tp", _get(d, "strategy.tp", 1)),
        dp_shard=_bool("strategy.dp_shard", _get(d, "strategy.dp_shard", False)),
    )

    init = _choice("model.init", _get(d, "model.init", "seeded"), INITS)
    init_path = _get(d, "model.init_path", None)
    if init == "file" and not init_path:
        raise ConfigError("model.init_path", init_path, "is needed with model.init=file")
    model = ModelConfig(
        dims=_int_list("model.dims", _get(d, "model.dims", None), min_len=2, min_value=1),
        activation=_choice("model.activation", _get(d, "model.activation", "relu"), ACTIVATIONS),
        loss=_choice("model.loss", _get(d, "model.loss", "cross_entropy"), LOSSES),
        bias=_bool("model.bias", _get(d, "model.bias", False)),
        weight_decay=_float("model.weight_decay", _get(d, "model.weight_decay", 0.0),
                            non_negative=True),
        init=init,
        init_path=str(init_path) if init_path else None,
    )

    data_node = _get(d, "data", "synthetic")
    dname = data_node if isinstance(data_node, str) else _get(d, "data.name", "synthetic")
    dname = _choice("data", dname, DATASETS)
    dpath = _get(d, "data.path", None) if isinstance(data_node, dict) else None
    if dname == "npz" and not dpath:
        raise ConfigError("data.path", dpath, "is needed with data=npz")
    data = DataConfig(
        name=dname,
        path=str(dpath) if dpath else None,
        shuffle=_bool("data.shuffle", _get(d, "data.shuffle", False)),
        num_examples=_int("data.num_examples", _get(d, "data.num_examples", 4096), min_value=1),
        teacher_hidden=_int("data.teacher_hidden", _get(d, "data.teacher_hidden", 32),
                            min_value=1),
    )

    batch = _int("train.batch_size", _get(d, "train.batch_size", 256), min_value=1)
    micro_raw = _get(d, "train.microbatches", 1)
    micro = _int("train.microbatches", micro_raw, min_value=1)
    if batch % micro:
        raise ConfigError("train.microbatches", micro_raw,
                          f"must divide train.batch_size={batch} into equal micro-batches")
    train = TrainConfig(
        batch_size=batch,
        microbatches=micro,
        steps=_int("train.steps", _get(d, "train.steps", 10), min_value=1),
        lr=_float("train.lr", _get(d, "train.lr", 0.1), positive=True),
        momentum=_float("train.momentum", _get(d, "train.momentum", 0.0), non_negative=True),
        dtype=_choice("train.dtype", _get(d, "train.dtype", "float32"), DTYPES),
        warmup_steps=_int("train.warmup_steps", _get(d, "train.warmup_steps", 1), min_value=0),
        grad_check=_bool("train.grad_check", _get(d, "train.grad_check", True)),
    )
    if train.momentum >= 1:
        raise ConfigError("train.momentum", train.momentum, "must be < 1")
    train = _one_device_keys(d, train)

    world = _int("world_size", _get(d, "world_size", 1), min_value=1)
    fault_kind = _get(d, "fault.kind", None)
    fault = FaultConfig(
        rank=None if _get(d, "fault.rank", None) is None
        else _int("fault.rank", _get(d, "fault.rank", None), min_value=0),
        step=None if _get(d, "fault.step", None) is None
        else _int("fault.step", _get(d, "fault.step", None), min_value=0),
        kind=None if fault_kind in (None, "off", "none")
        else _choice("fault.kind", fault_kind, FAULT_KINDS),
    )
    cost = CostConfig(
        alpha_s=_float("cost.alpha_s", _get(d, "cost.alpha_s", 55e-6), non_negative=True),
        beta_Bps=_float("cost.beta_Bps", _get(d, "cost.beta_Bps", 5e9), positive=True),
        collective_alpha_s=_float("cost.collective_alpha_s",
                                  _get(d, "cost.collective_alpha_s", 230e-6), non_negative=True),
        collective_beta_Bps=_float("cost.collective_beta_Bps",
                                   _get(d, "cost.collective_beta_Bps", 2.6e9), positive=True),
        flops_per_s=_float("cost.flops_per_s", _get(d, "cost.flops_per_s", 115e9), positive=True),
        calibrate=_bool("cost.calibrate", _get(d, "cost.calibrate", False)),
        precheck=_bool("cost.precheck", _get(d, "cost.precheck", False)),
        profile=None if _get(d, "cost.profile", None) is None
        else str(_get(d, "cost.profile", None)),
    )
    trace = TraceConfig(steps=_trace_steps(_get(d, "trace.steps", "last")),
                        profiler=_bool("trace.profiler", _get(d, "trace.profiler", False)))
    cfg = RunConfig(
        model=model,
        strategy=strategy,
        data=data,
        train=train,
        fault=fault,
        cost=cost,
        trace=trace,
        world_size=world,
        device=_choice("device", _get(d, "device", "auto"), DEVICES),
        memory_limit=parse_bytes("memory_limit", _get(d, "memory_limit", None)),
        engine=_choice("engine", _get(d, "engine", "explicit"), ENGINES),
        timeout_s=_in_range("timeout_s", _get(d, "timeout_s", 60),
                            _float("timeout_s", _get(d, "timeout_s", 60), positive=True),
                            *TIMEOUT_RANGE_S, unit=" s",
                            why="how long a rank waits for a silent peer; 604800 s = 7 days"),
        seed=_in_range("seed", _get(d, "seed", 0),
                       _int("seed", _get(d, "seed", 0), min_value=0), *SEED_RANGE,
                       why="2**32 - 1 at most: the data's shuffle multiplies it into "
                           "torch's 64-bit generator seeds"),
        memory_probe=_bool("memory_probe", _get(d, "memory_probe", True)),
        threads_per_rank=None if _get(d, "threads_per_rank", None) is None
        else _int("threads_per_rank", _get(d, "threads_per_rank", None), min_value=1),
    )
    _check_cross(cfg)
    return cfg


def _one_device_keys(d: dict[str, Any], train: TrainConfig) -> TrainConfig:
    """train.recompute, train.precision (null: the dtype's own), train.optimizer and Adam's
    betas / eps, with the combinations that make no sense refused (docs/one-device.md)."""
    from dataclasses import replace

    recompute = _choice("train.recompute", _get(d, "train.recompute", "none"), RECOMPUTE)
    raw = _get(d, "train.precision", None)
    precision = (OWN_PRECISION[train.dtype] if raw in (None, "null", "auto")
                 else _choice("train.precision", raw, PRECISIONS))
    if train.dtype not in PRECISION_DTYPES[precision]:
        why = ("bf16 mixed precision keeps float32 master weights (train.dtype=float32)"
               if precision == "bf16" else
               f"{precision} is train.dtype={PRECISION_DTYPES[precision][0]}'s own precision; "
               f"train.dtype={train.dtype} computes in {OWN_PRECISION[train.dtype]}")
        raise ConfigError("train.precision", precision, f"{why}, not train.dtype={train.dtype}")
    optimizer = _choice("train.optimizer", _get(d, "train.optimizer", "sgd"), OPTIMIZERS)
    betas_raw = _get(d, "train.betas", [0.9, 0.999])
    if isinstance(betas_raw, (str, int, float)) or betas_raw is None or len(betas_raw) != 2:
        raise ConfigError("train.betas", betas_raw, "must be a list of two numbers [β₁,β₂]")
    betas = tuple(_float("train.betas", b, non_negative=True) for b in betas_raw)
    if any(b >= 1 for b in betas):
        raise ConfigError("train.betas", list(betas), "each must be in [0, 1)")
    eps = _float("train.eps", _get(d, "train.eps", 1e-8), positive=True)
    if optimizer != "sgd" and train.momentum:
        raise ConfigError("train.momentum", train.momentum,
                          f"is SGD's; train.optimizer={optimizer} uses train.betas")
    return replace(train, recompute=recompute, precision=precision, optimizer=optimizer,
                   betas=betas, eps=eps)


def _balance(v: Any) -> tuple[int, ...] | str | None:
    if v in (None, "params"):
        return None
    if v in ("flops", "time"):
        return v
    if isinstance(v, str):
        raise ConfigError("strategy.balance", v,
                          "must be params, flops, time, or a list of layers per stage")
    return _int_list("strategy.balance", v, min_len=1, min_value=1)


def _mesh_size(key: str, v: Any, *, auto: bool = False) -> int | str:
    if auto and v == "auto":
        return v
    if isinstance(v, str) and not auto:
        raise ConfigError(key, v, "must be an integer >= 1")
    if isinstance(v, str):
        raise ConfigError(key, v, "must be an integer >= 1 or auto")
    return _int(key, v, min_value=1)


def _check_hybrid(cfg: RunConfig) -> None:
    """The mesh divides the world, and each dimension's plan fits the net and the batch."""
    from partition.plans.mesh import resolve_mesh, stage_shards
    from partition.plans.stages import plan_stages
    from partition.plans.tensor import split_widths

    s = cfg.strategy
    try:
        mesh = resolve_mesh(world=cfg.world_size, dp=s.dp, pp=s.pp, tp=s.tp)
    except ValueError as e:
        key = "strategy.dp" if s.dp != "auto" else "world_size"
        raise ConfigError(key, s.dp if key == "strategy.dp" else cfg.world_size,
                          str(e)) from None
    L, B, M = cfg.spec.num_layers, cfg.train.batch_size, cfg.train.microbatches
    v = s.virtual_stages
    if not s.schedule.endswith(".csv") and mesh.pp * v > L:
        raise ConfigError("strategy.pp", mesh.pp,
                          f"a pipeline needs at most one stage per layer; {s.schedule} cuts "
                          f"model.dims' {L} layers into strategy.pp×virtual_stages="
                          f"{mesh.pp}×{v} stages")
    if B % mesh.dp or (B // mesh.dp) % M:
        raise ConfigError("train.batch_size", B,
                          f"must split into strategy.dp={mesh.dp} equal replicas of "
                          f"train.microbatches={M} equal micro-batches (a multiple of "
                          f"{mesh.dp * M})")
    bal = s.balance
    if bal is not None and not isinstance(bal, str) and sum(bal) != L:
        raise ConfigError("strategy.balance", list(bal), f"must sum to the {L} layers of model.dims")
    if bal == "time":
        raise ConfigError("strategy.balance", bal, "strategy=hybrid takes params, flops or a "
                                                   "list of layers per stage (time is measured "
                                                   "for strategy=pipeline only)")
    sched = _check_schedule(cfg, world=mesh.pp)
    for start, end in plan_stages(cfg.spec, sched.stages, bal):
        widths = split_widths(s.layout, cfg.model.dims[start:end + 1])
        if widths and mesh.tp > min(widths):
            raise ConfigError("strategy.tp", mesh.tp,
                              f"tensor layout {s.layout} splits widths {widths} of the stage "
                              f"holding layers {start}..{end - 1}; every tp rank needs at least "
                              f"one unit of the narrowest, {min(widths)}")
        stage_shards(s.layout, cfg.model.dims, start, end, tp=mesh.tp, rank=0)
    if cfg.engine == "torch":
        _check_torch_hybrid(cfg, mesh, sched)


def _check_torch_hybrid(cfg: RunConfig, mesh: Any, sched: Schedule) -> None:
    """What engine=torch (engines/hybrid.py: pipelining stages, DTensor on mesh["tp"], DDP
    on mesh["dp"]) cannot run of a valid mesh."""
    from partition.plans.stages import plan_stages

    s = cfg.strategy
    if s.dp_shard:  # (refused above for both engines until the explicit one builds it)
        raise ConfigError("strategy.dp_shard", True,
                          "engine=torch runs the data dimension as DDP (FSDP2 over a "
                          "tensor-parallel mesh is not built here); use engine=explicit")
    if mesh.dp > 1 and any(a.kind == "W" for acts in sched.ranks for a in acts):
        raise ConfigError("strategy.schedule", s.schedule,
                          f"torch's DDP all-reduces the gradients of a full backward only; "
                          f"{s.schedule} computes weight gradients in a separate pass (W), "
                          f"which DDP misses (strategy.dp={mesh.dp}); use strategy.dp=1, a "
                          f"schedule without W, or engine=explicit")
    _check_torch_schedule(cfg, mesh.pp, "strategy.pp")
    for start, end in plan_stages(cfg.spec, sched.stages, s.balance):
        _check_torch_widths(cfg, start, end, mesh.tp, "strategy.tp")


def _trace_steps(v: Any) -> str | tuple[int, ...]:
    if v in ("last", "all"):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if isinstance(v, (list, tuple)):
        return tuple(_int("trace.steps", x, min_value=0) for x in v)
    raise ConfigError("trace.steps", v, "must be last, all, or a list of step numbers")


def _schedule(v: Any) -> str:
    if isinstance(v, str) and v.endswith(".csv"):
        return v
    return _choice("strategy.schedule", v, SCHEDULES)


def _virtual(schedule: str, v: Any, *, resolve: bool) -> int | None:
    """strategy.virtual_stages: null or an integer >= 1; for a named pipeline schedule,
    resolved to its stages per rank (refused where the schedule has a fixed number)."""
    from partition.plans.generators import virtual_stages
    from partition.plans.schedule import ScheduleError

    raw = None if v is None or (isinstance(v, str) and v.lower() in ("null", "none")) else (
        _int("strategy.virtual_stages", v, min_value=1))
    if not resolve or schedule.endswith(".csv"):
        return raw
    try:
        return virtual_stages(schedule, raw)
    except ScheduleError as e:
        raise ConfigError("strategy.virtual_stages", raw, str(e)) from None


def _check_schedule(cfg: RunConfig, *, world: int | None = None) -> Schedule:
    """Load and validate the pipeline schedule (complete, ordered, deadlock-free) over
    `world` pipeline ranks (the world size; a hybrid mesh's pp)."""
    from partition.plans.schedule import ScheduleError, load_schedule

    try:
        sched = load_schedule(cfg.strategy.schedule, world=world or cfg.world_size,
                              micro=cfg.train.microbatches, virtual=cfg.strategy.virtual_stages)
    except ScheduleError as e:
        raise ConfigError("strategy.schedule", cfg.strategy.schedule, str(e)) from None
    L = cfg.spec.num_layers
    if sched.stages > L:
        raise ConfigError("strategy.schedule", cfg.strategy.schedule,
                          f"{sched.stages} stages for the {L} layers of model.dims: every stage "
                          f"needs at least one layer")
    bal = cfg.strategy.balance
    if bal is not None and not isinstance(bal, str) and len(bal) != sched.stages:
        raise ConfigError("strategy.balance", list(bal),
                          f"needs one entry per stage ({sched.stages} stages)")
    return sched


def _check_cross(cfg: RunConfig) -> None:
    """Checks that involve more than one key (each still names the key to change)."""
    _check_switches(cfg)
    t = cfg.train
    if t.warmup_steps >= t.steps:
        raise ConfigError("train.warmup_steps", t.warmup_steps,
                          f"must be < train.steps={t.steps}: the step times are taken after "
                          f"the warm-up (set train.warmup_steps=0 to time every step)")
    f = cfg.fault
    if f.enabled:
        if f.rank is None or f.step is None:
            raise ConfigError("fault.kind", f.kind, "needs fault.rank and fault.step")
        if f.rank >= cfg.ranks:
            raise ConfigError("fault.rank", f.rank, f"must be < the {cfg.ranks} ranks of this run")
        if f.step >= cfg.train.steps:
            raise ConfigError("fault.step", f.step, f"must be < train.steps={cfg.train.steps}")
    L = cfg.spec.num_layers
    if cfg.strategy.name == "pipeline":
        v = cfg.strategy.virtual_stages
        if not cfg.strategy.schedule.endswith(".csv") and cfg.world_size * v > L:
            # A named schedule cuts the net into P·v stages of at least one layer each.
            if v == 1:
                raise ConfigError("world_size", cfg.world_size,
                                  f"pipeline needs at most one stage per layer; model.dims has "
                                  f"{L} layers")
            raise ConfigError("strategy.virtual_stages", v,
                              f"{cfg.strategy.schedule} on world_size={cfg.world_size} cuts the "
                              f"net into {cfg.world_size}×{v}={cfg.world_size * v} stages; "
                              f"model.dims has {L} layers and every stage needs at least one")
        bal = cfg.strategy.balance
        if bal is not None and not isinstance(bal, str):
            if sum(bal) != L:
                raise ConfigError("strategy.balance", list(bal),
                                  f"must sum to the {L} layers of model.dims")
        _check_schedule(cfg)
    if cfg.strategy.name in ("data", "fsdp") and cfg.train.batch_size < cfg.world_size:
        raise ConfigError("train.batch_size", cfg.train.batch_size,
                          f"{cfg.strategy.name} parallel needs at least one example per rank "
                          f"(world_size={cfg.world_size})")
    if cfg.strategy.name in ("data", "fsdp"):
        fewest = cfg.train.batch_size // cfg.world_size  # rows on the last ranks
        if cfg.train.microbatches > fewest:
            raise ConfigError("train.microbatches", cfg.train.microbatches,
                              f"{cfg.strategy.name} parallel splits each rank's rows into "
                              f"micro-batches; the "
                              f"smallest share of train.batch_size={cfg.train.batch_size} over "
                              f"world_size={cfg.world_size} is {fewest} rows")
    if cfg.strategy.name == "tensor":
        # Imported here: the strategies package imports this module.
        from partition.plans.tensor import split_widths

        layout = cfg.strategy.layout
        widths = split_widths(layout, cfg.model.dims)
        if widths and cfg.world_size > min(widths):
            raise ConfigError("world_size", cfg.world_size,
                              f"tensor layout {layout} splits widths {widths} of model.dims; "
                              f"every rank needs at least one unit of the narrowest, {min(widths)}")
    if (cfg.strategy.name == "fsdp" and not cfg.strategy.reshard_after_forward
            and cfg.strategy.zero_stage != 3):
        raise ConfigError("strategy.reshard_after_forward", False,
                          f"only applies to strategy.zero_stage=3 (stage "
                          f"{cfg.strategy.zero_stage} keeps full weights, it gathers nothing "
                          f"before a forward)")
    if (cfg.strategy.name == "hybrid" and not cfg.strategy.reshard_after_forward
            and not cfg.strategy.dp_shard):
        raise ConfigError("strategy.reshard_after_forward", False,
                          "only applies to strategy.dp_shard=true (a plain data dimension "
                          "keeps full weights, it gathers nothing before a forward)")
    if cfg.strategy.name == "hybrid":
        _check_hybrid(cfg)
    if cfg.strategy.name in ("fsdp", "hybrid"):
        t = cfg.train
        why = {"fsdp": "its sharded optimizer state takes train.optimizer",
               "hybrid": "the mesh's plan does not count recomputation's or bf16's crossings"}
        for key, value, plain in (("train.recompute", t.recompute, "none"),
                                  ("train.precision", t.precision, OWN_PRECISION[t.dtype])):
            if value != plain:
                raise ConfigError(key, value, f"strategy={cfg.strategy.name} runs {key}={plain} "
                                              f"({why[cfg.strategy.name]})")
    if cfg.engine == "torch":
        _check_torch_engine(cfg)


# Settings that only mean something under a switch: (key, its value here, its default,
# the strategies it applies to). Given anything but the default elsewhere, it would be
# silently ignored.
def _strategy_settings(cfg: RunConfig) -> list[tuple[str, Any, Any, tuple[str, ...]]]:
    s, default = cfg.strategy, StrategyConfig()
    return [("strategy.schedule", s.schedule, default.schedule, ("pipeline", "hybrid")),
            ("strategy.virtual_stages", s.virtual_stages, default.virtual_stages,
             ("pipeline", "hybrid")),
            ("strategy.balance", s.balance, default.balance, ("pipeline", "hybrid")),
            ("strategy.layout", s.layout, default.layout, ("tensor", "hybrid")),
            ("strategy.dp", s.dp, default.dp, ("hybrid",)),
            ("strategy.pp", s.pp, default.pp, ("hybrid",)),
            ("strategy.tp", s.tp, default.tp, ("hybrid",)),
            ("strategy.dp_shard", s.dp_shard, default.dp_shard, ("hybrid",))]


def _check_switches(cfg: RunConfig) -> None:
    """A setting given without the switch that turns it on is refused, naming the switch."""
    if cfg.model.init_path is not None and cfg.model.init != "file":
        raise ConfigError("model.init_path", cfg.model.init_path,
                          f"is read only with model.init=file (model.init={cfg.model.init})")
    if cfg.data.path is not None and cfg.data.name != "npz":
        raise ConfigError("data.path", cfg.data.path,
                          f"is read only with data=npz (data={cfg.data.name})")
    f = cfg.fault
    for key, value in (("fault.rank", f.rank), ("fault.step", f.step)):
        if value is not None and not f.enabled:
            raise ConfigError(key, value, "does nothing without fault.kind (raise | exit | hang)")
    for key, value, default, strategies in _strategy_settings(cfg):
        if value != default and cfg.strategy.name not in strategies:
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(key, shown, f"applies to strategy={' | '.join(strategies)} only "
                                          f"(strategy={cfg.strategy.name})")
    if cfg.cost.precheck and cfg.memory_limit is None:
        raise ConfigError("cost.precheck", True, "does nothing without memory_limit")


def _check_torch_engine(cfg: RunConfig) -> None:
    """What PyTorch's own engines (partition/engines) cannot do, refused before any rank starts."""
    P = cfg.world_size
    t = cfg.train
    for key, value, plain in (("train.recompute", t.recompute, "none"),
                              ("train.precision", t.precision, OWN_PRECISION[t.dtype]),
                              ("train.optimizer", t.optimizer, "sgd")):
        if value != plain:
            raise ConfigError(key, value, f"engine=torch runs {key}={plain}; this one runs on "
                                          f"engine=explicit")
    if cfg.strategy.name == "fsdp" and cfg.strategy.zero_stage != 3:
        raise ConfigError("strategy.zero_stage", cfg.strategy.zero_stage,
                          "engine=torch runs FSDP2 (fully_shard), which is zero_stage=3; "
                          "stages 1 and 2 run on engine=explicit")
    if cfg.strategy.name == "pipeline":
        _check_torch_schedule(cfg, P, "world_size")
    if cfg.strategy.name == "tensor":
        _check_torch_widths(cfg, 0, cfg.spec.num_layers, P, "world_size")


def _check_torch_schedule(cfg: RunConfig, P: int, ranks: str) -> None:
    """torch's schedule classes on P pipeline ranks (`ranks` names the key that sets P)."""
    M, sched = cfg.train.microbatches, cfg.strategy.schedule
    if sched == "1f1b" and M < P:
        raise ConfigError("train.microbatches", M,
                          f"engine=torch's Schedule1F1B needs >= {ranks}={P} micro-batches")
    if sched in ("interleaved_1f1b", "zb1p"):
        # torch orders the micro-batches of its interleaved schedules in max(1, M // P) equal
        # rounds even with one stage per rank, where the explicit engine needs none.
        rounds = max(1, M // P)
        if M % rounds:
            cls = {"interleaved_1f1b": "ScheduleInterleaved1F1B",
                   "zb1p": "ScheduleInterleavedZeroBubble"}[sched]
            raise ConfigError("train.microbatches", M,
                              f"engine=torch's {cls} runs M in max(1, M // P)={rounds} equal "
                              f"rounds ({ranks}={P}); M must be a multiple of {rounds}")


def _check_torch_widths(cfg: RunConfig, start: int, end: int, P: int, ranks: str) -> None:
    """DTensor tensor parallel of layers [start, end) over P ranks (`ranks` names the key)."""
    if cfg.strategy.layout != "megatron":
        return
    # A column-parallel layer followed by a row-parallel one: DTensor.from_local rebuilds
    # the row layer's input assuming even shards.
    dims = cfg.model.dims
    for l in range(start, end - 1, 2):
        if dims[l + 1] % P:
            raise ConfigError("model.dims", list(dims),
                              f"engine=torch tensor parallel needs width {dims[l + 1]} "
                              f"(layer {l + 1}) divisible by {ranks}={P}")
