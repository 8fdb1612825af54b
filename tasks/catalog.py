"""Importing this module registers every task with harness.registry.TASKS."""

from tasks import (  # noqa: F401
    autograd_fit,
    char_ppl,
    glue,
    mutants,
    ngram_rules,
    parity,
    ppl,
    rl_rules,
    seq2seq,
    throughput,
    tokenizer_tasks,
)
