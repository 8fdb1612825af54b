"""Importing this module registers every task with harness.registry.TASKS."""

from tasks import glue, parity, ppl  # noqa: F401
