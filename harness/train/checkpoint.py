"""Checkpoints in `--out`: the model in HF format (config.json + model.safetensors + tokenizer.json,
loadable with `GPT2LMHeadModel.from_pretrained(out)`) and `train_state.pt`, everything else a resumed
run needs (step, optimizer, RNG states, curves). Both are written to a temporary name and renamed, so
an interrupted write never leaves a half checkpoint.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from harness.api import HarnessError, ModelAdapter

STATE_FILE = "train_state.pt"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def hf_state(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """The module's weights in the reference (GPT2LMHeadModel) names and layouts, detached."""
    return {k: v.detach() for k, v in adapter.reference_layout(dict(adapter.module.state_dict())).items()}


def save_model(out: Path, adapter: ModelAdapter, dtype: str) -> dict[str, torch.Tensor]:
    """config.json + model.safetensors (+ tokenizer.json); returns the fp32 HF-layout state."""
    from safetensors.torch import save_file

    state = hf_state(adapter)
    config = copy.deepcopy(adapter.weights.hf_config)
    tied = getattr(config, "tie_word_embeddings", False)
    tensors = {
        k: v.to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")
    }  # the tied head is wte
    config.dtype = "float32"  # transformers 5 loads with dtype="auto": this makes it upcast to fp32
    config.save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes 0600
    adapter.tokenizer.backend.save(str(out / "tokenizer.json"))
    return state


def write_state(out: Path, payload: dict) -> None:
    """train_state.pt, replaced in one rename."""
    torch.save(payload, out / f"{STATE_FILE}.tmp")
    os.replace(out / f"{STATE_FILE}.tmp", out / STATE_FILE)


def read_state(out: Path) -> dict:
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise HarnessError(f"--resume: no {STATE_FILE} in '{out}'; start without --resume")
    return torch.load(path, map_location="cpu", weights_only=True)
