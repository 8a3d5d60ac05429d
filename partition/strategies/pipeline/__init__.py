"""`pipeline`: contiguous runs of layers per rank, GPipe or 1F1B over micro-batches."""

from partition.strategies.pipeline.plan import plan_stages
from partition.strategies.pipeline.runner import PipelineRunner
from partition.strategies.pipeline.schedules import (
    gpipe_actions,
    max_in_flight,
    one_f_one_b_actions,
)

__all__ = ["PipelineRunner", "gpipe_actions", "max_in_flight", "one_f_one_b_actions", "plan_stages"]
