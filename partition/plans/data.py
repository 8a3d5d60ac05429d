"""Data-parallel plan: each rank's rows of the batch and the gradient all-reduce. Pure.

Rank r takes rows split_evenly(B, P)[r] (the first B mod P ranks take one more); its
M micro-batches are split_evenly of those rows. The gradients cross once per step in
one flat bucket: Σ_l (n_l·n_{l−1} + [bias] n_l)·b bytes in one all-reduce (role
`weight_grad`, phase update; wire ⌊2(P−1)/P · that⌋), then the metric (3·8 bytes).
Nothing crosses for training at P = 1.
"""

from __future__ import annotations

from partition.plans.split import split_evenly, width
from partition.plans.stages import NetShape, layer_params
from partition.plans.traffic import Call, RoleTraffic, by_role, collective, metric_call


def row_share(batch: int, world: int, rank: int) -> tuple[int, int]:
    """The half-open range of the step's batch rows that `rank` takes."""
    return split_evenly(batch, world)[rank]


def data_rows(batch: int, world: int, rank: int) -> int:
    return width(row_share(batch, world, rank))


def param_count(spec: NetShape) -> int:
    return sum(layer_params(spec.dims, l, bias=spec.bias) for l in range(len(spec.dims) - 1))


def data_calls(spec: NetShape, *, world: int, itemsize: int) -> list[Call]:
    """The collectives of one step on any rank, in order."""
    out: list[Call] = []
    if world > 1:
        out.append(collective("weight_grad", "update", "all_reduce", param_count(spec) * itemsize,
                              world))
    return out + [metric_call(world)]


def data_traffic(spec: NetShape, *, world: int, itemsize: int) -> dict[str, RoleTraffic]:
    """The byte formula of the module docstring, per role, for one rank and one step."""
    return by_role(data_calls(spec, world=world, itemsize=itemsize))
