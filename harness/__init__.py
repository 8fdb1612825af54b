"""Benchmark harness: scores from-scratch reproductions of classic LMs against the HF originals."""

__version__ = "0.1.0"
