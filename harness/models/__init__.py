"""Model registrations: importing this package registers every `<arch>-scratch` / `<arch>-hf` pair."""

from harness.models import bert, decoders, gpt2  # noqa: F401
