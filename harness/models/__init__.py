"""Model registrations: importing this package registers every model with harness.registry.MODELS."""

from harness.models import bert, charlm, decoders, gpt2, rl, seq2seq, tokenizers_pair, user  # noqa: F401
