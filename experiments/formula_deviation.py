"""How far each closed form of partition/costs.py is from the dry run (docs/cost-model.md).

    python -m experiments.formula_deviation                  # the table in docs/cost-model.md
    python -m experiments.formula_deviation strategy=pipeline world_size=2 train.microbatches=4

With no overrides: the seed [784, 2048, 10] at B=512 float32 under every strategy and
schedule, the deep net (conf/model/deep.yaml, [784, 512, 512, 256, 10]) for 3- and
4-stage pipelines and for hybrid meshes, and every case of the headline comparison
(conf/experiment/compare.yaml). With overrides (the same as experiments.run): that one config. Nothing is started: the dry run runs each rank's runner on the meta
device (partition/dryrun.py), the formulas are costs.formula(). One row per distinct
rank (ranks with identical plans are one row, ×count); deviation is
(formula − dry run) / dry run.
"""

from __future__ import annotations

import sys
from typing import Any

SEED = ["model.dims=[784,2048,10]", "train.batch_size=512", "train.dtype=float32"]
DEEP = ["model=deep", "train.batch_size=512", "train.dtype=float32"]

# (label, overrides): what the default table covers besides the compare cases
CASES: list[tuple[str, list[str]]] = [
    ("seed single", [*SEED]),
    ("seed single M=4", [*SEED, "train.microbatches=4"]),
    *[(f"seed pipeline {s} P=2 M={m}",
       [*SEED, "strategy=pipeline", "world_size=2", f"strategy.schedule={s}",
        f"train.microbatches={m}"]) for s in ("gpipe", "1f1b") for m in (1, 2, 4)],
    *[(f"deep pipeline {s} P={p} M=4",
       [*DEEP, "strategy=pipeline", f"world_size={p}", f"strategy.schedule={s}",
        "train.microbatches=4"]) for s in ("gpipe", "1f1b") for p in (3, 4)],
    *[(f"seed tensor {lay} P={p}",
       [*SEED, "strategy=tensor", f"world_size={p}", f"strategy.layout={lay}"])
      for lay in ("megatron", "rowwise") for p in (2, 4)],
    *[(f"seed data P={p}", [*SEED, "strategy=data", f"world_size={p}"]) for p in (2, 4)],
    ("seed hybrid dp2×tp2", [*SEED, "strategy=hybrid", "world_size=4", "strategy.dp=2",
                             "strategy.tp=2"]),
    *[(f"deep hybrid {mesh} {s} M=4",
       [*DEEP, "strategy=hybrid", f"world_size={w}", *over, f"strategy.schedule={s}",
        "train.microbatches=4", "strategy.balance=[2,2]"])
      for mesh, w, over in (("dp2×pp2", 4, ["strategy.dp=2", "strategy.pp=2"]),
                            ("pp2×tp2", 4, ["strategy.pp=2", "strategy.tp=2"]),
                            ("dp2×pp2×tp2", 8, ["strategy.dp=2", "strategy.pp=2",
                                                "strategy.tp=2"]))
      for s in ("gpipe", "1f1b")],
]

_STATE = ("params_bytes", "grads_bytes", "optimizer_bytes")
_COMM = ("sent_bytes", "recv_bytes", "collective_bytes", "wire_bytes", "messages")


def _worst(row: dict[str, Any], keys: tuple[str, ...]) -> str:
    devs = [row[k][2] for k in keys]
    if any(d is None for d in devs):
        return "n/a"
    worst = max(devs, key=abs)
    return "0" if worst == 0 else f"{worst:+.2%}"


def table(cases: list[tuple[str, Any]]) -> str:
    """Markdown: one line per distinct rank of each (label, RunConfig)."""
    from partition.costs import formula_deviation

    lines = ["| config | rank | peak, dry run (B) | peak, formula (B) | deviation | peak at "
             "| state | kept | comm |",
             "|---|---|---:|---:|---:|---|---|---|---|"]
    for label, cfg in cases:
        for row in formula_deviation(cfg):
            dry, form, dev = row["peak_bytes"]
            ranks = f"{row['rank']}" + (f" (×{row['count']})" if row["count"] > 1 else "")
            lines.append(f"| {label} | {ranks} | {dry:,} | {form:,} | {form - dry:+,} B "
                         f"({dev:+.2%}) | {row['moment']} | {_worst(row, _STATE)} "
                         f"| {_worst(row, ('activations_bytes',))} | {_worst(row, _COMM)} |")
    return "\n".join(lines)


def default_cases() -> list[tuple[str, Any]]:
    from experiments.compare import _parse, plan

    out = [(label, _parse(over)[1]) for label, over in CASES]
    _, planned = plan([])
    return out + [(f"compare {c.name}", rc) for c, rc in planned]


def main(argv: list[str] | None = None) -> int:
    from experiments.cli import split_args
    from experiments.compare import _parse

    _, overrides = split_args(sys.argv[1:] if argv is None else argv)
    cases = [(" ".join(overrides), _parse(overrides)[1])] if overrides else default_cases()
    print(table(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
