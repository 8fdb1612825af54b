"""Model registrations: importing this package registers every `<arch>-scratch` / `<arch>-hf` pair."""

from harness.models import (  # noqa: F401  # noqa: F401
    bert,
    charlm,  # noqa: F401
    decoders,
    gpt2,
    seq2seq,
    tokenizers_pair,
)
