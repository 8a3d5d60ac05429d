"""Partition the seed MLP's computational graph across devices and measure what it costs."""

__version__ = "0.1.0"
