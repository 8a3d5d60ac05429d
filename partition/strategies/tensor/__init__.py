"""`tensor`: weight matrices sharded across ranks (Megatron pairs, or every layer by rows)."""

from partition.strategies.tensor.plan import (
    LayerShard,
    megatron_plan,
    plan_layers,
    rowwise_plan,
    split_evenly,
    split_widths,
    tensor_traffic,
)
from partition.strategies.tensor.runner import TensorRunner

__all__ = ["LayerShard", "TensorRunner", "megatron_plan", "plan_layers", "rowwise_plan",
           "split_evenly", "split_widths", "tensor_traffic"]
