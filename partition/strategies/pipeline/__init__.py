"""`pipeline`: stages of contiguous layers on ranks, run by one action-list runtime."""

from partition.strategies.pipeline.runner import PipelineRunner, pipeline_schedule

__all__ = ["PipelineRunner", "pipeline_schedule"]
