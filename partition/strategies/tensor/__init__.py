"""`tensor`: weight matrices sharded across ranks (Megatron pairs, or every layer by rows).

The shard plans live in `partition.plans.tensor`; this package executes them.
"""

from partition.strategies.tensor.runner import TensorRunner

__all__ = ["TensorRunner"]
