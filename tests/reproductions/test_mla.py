"""Multi-head latent attention against transformers' DeepseekV2ForCausalLM (all layers dense).

fp32 on CPU, atol 1e-5 and rtol 0 everywhere. `make_pair` redraws HF's random weights with
std 0.05 (HF: 0.02) and moves RMSNorm gains, the latent norms' included, off 1. Measured max
|diff| on the tiny configs: logits 8e-7, gradients 2e-7, cached vs uncached 8e-7. Rotating
(x[i], x[i + d/2]) pairs instead of DeepSeek's adjacent pairs moves logits by 0.2.
HF's own cache also stores the latent but re-expands it per head at every step; ours attends
in the absorbed form (W^UK folded into the query, W^UV into the output), so the
cached-vs-uncached and greedy-generation tests also check that absorption is exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reproductions.common import CheckpointMismatchError
from reproductions.mla import (
    LatentCache,
    MLAConfig,
    MLAModel,
    name_to_config,
)

transformers = pytest.importorskip("transformers")


def hf_config(cfg: MLAConfig):
    return transformers.DeepseekV2Config(**cfg.to_hf_kwargs())

ATOL = 1e-5
INIT_STD = 0.05  # 2.5x HF's 0.02: sharper attention, GELU/SiLU off their linear range, so slips show
CONFIGS = [
    pytest.param(MLAConfig.from_name("tiny"), id="tiny"),
    pytest.param(MLAConfig.from_name("tiny-q-lora"), id="tiny-q-lora"),
    # nothing hard-coded: other head count, latent ranks, head widths, theta, epsilon; tied head
    pytest.param(
        MLAConfig.from_name(
            "tiny",
            vocab_size=517,
            n_layer=3,
            n_head=3,
            n_embd=36,
            intermediate_size=72,
            kv_lora_rank=24,
            q_lora_rank=20,
            qk_nope_head_dim=10,
            qk_rope_head_dim=6,
            v_head_dim=14,
            rope_theta=50000.0,
            norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
        id="unseen-3heads-tied",
    ),
]


def make_pair(cfg: MLAConfig, seed: int = 0) -> tuple[MLAModel, torch.nn.Module]:
    """A seeded random HF DeepSeek-V2 (dense) and our model holding the same weights, both in eval mode."""
    torch.manual_seed(seed)
    hf = transformers.DeepseekV2ForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:  # RMSNorm gains, including the latent norms
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, INIT_STD)
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return MLAModel.from_hf(hf.config, hf.state_dict()).eval(), hf


def random_tokens(cfg: MLAConfig, shape=(2, 16), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_pair():
    return make_pair(MLAConfig.from_name("tiny"))


@pytest.mark.parametrize("cfg", CONFIGS)
@torch.no_grad()
def test_logits_match_hf(cfg):
    ours, hf = make_pair(cfg)
    idx = random_tokens(cfg)
    torch.testing.assert_close(ours(idx), hf(idx).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_gradients_match_hf_in_hf_layout(cfg):
    ours, hf = make_pair(cfg)
    idx, targets = random_tokens(cfg, seed=1), random_tokens(cfg, seed=2)
    for logits in (ours(idx), hf(idx).logits):
        F.cross_entropy(logits.view(-1, cfg.vocab_size), targets.view(-1)).backward()
    ours_grads = ours.to_hf_state_dict({k: p.grad for k, p in ours.named_parameters()})
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    assert hf_grads.keys() <= ours_grads.keys()
    for k, g in hf_grads.items():
        torch.testing.assert_close(ours_grads[k], g, atol=ATOL, rtol=0, msg=k)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_greedy_generate_matches_hf(cfg):
    ours, hf = make_pair(cfg)
    prompt = random_tokens(cfg, shape=(2, 5))
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20)
    got = ours.generate(prompt, max_new_tokens=20, temperature=0.0)
    assert got.shape == (2, 25)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("cfg", CONFIGS)
@torch.no_grad()
def test_cached_absorbed_logits_match_uncached_expanded(cfg):
    ours = make_pair(cfg)[0]
    idx = random_tokens(cfg, shape=(2, 12))
    full = ours(idx)  # (B, T, V), keys and values expanded per head
    cache = LatentCache(cfg, batch_size=2, max_len=12)
    torch.testing.assert_close(ours(idx[:, :4], kv_cache=cache), full[:, :4], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(idx[:, 4:7], kv_cache=cache), full[:, 4:7], atol=ATOL, rtol=0)
    for t in range(7, 12):
        step = ours(idx[:, t : t + 1], kv_cache=cache)  # (B, 1, V)
        torch.testing.assert_close(step, full[:, t : t + 1], atol=ATOL, rtol=0, msg=f"position {t}")
    assert cache.pos == 12


def test_cache_holds_only_the_latent():
    cfg = MLAConfig.from_name("tiny")
    cache = LatentCache(cfg, batch_size=2, max_len=10)
    assert cache.c_kv.shape == (cfg.n_layer, 2, 10, cfg.kv_lora_rank)
    assert cache.k_rope.shape == (cfg.n_layer, 2, 10, cfg.qk_rope_head_dim)
    per_token = (cache.c_kv.numel() + cache.k_rope.numel()) // (2 * 10)
    assert per_token == cfg.kv_floats_per_token == cfg.n_layer * (32 + 8)
    mha_per_token = cfg.n_layer * cfg.n_head * (cfg.qk_head_dim + cfg.v_head_dim)  # keys and values per head
    assert per_token * 4 == mha_per_token


@pytest.mark.parametrize("cfg", CONFIGS)
def test_state_dict_round_trip(cfg):
    ours, hf = make_pair(cfg)
    hf_sd, sd = hf.state_dict(), ours.state_dict()
    back_to_hf = MLAModel.from_hf(hf.config, hf_sd).to_hf_state_dict()
    back_to_ours = MLAModel.from_hf(hf.config, ours.to_hf_state_dict()).state_dict()
    assert back_to_hf.keys() == hf_sd.keys() and back_to_ours.keys() == sd.keys()
    for k in hf_sd:
        torch.testing.assert_close(back_to_hf[k], hf_sd[k], atol=0, rtol=0, msg=k)
    for k in sd:
        torch.testing.assert_close(back_to_ours[k], sd[k], atol=0, rtol=0, msg=k)


def _drop_key(sd):
    del sd["model.layers.1.self_attn.kv_a_layernorm.weight"]
    return "model.layers.1.self_attn.kv_a_layernorm.weight"


def _wrong_shape(sd):
    sd["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(96, 32)  # v_head_dim 16 -> 8
    return "model.layers.0.self_attn.kv_b_proj.weight (96, 32) != (128, 32)"


def _q_lora_checkpoint(sd):
    sd["model.layers.0.self_attn.q_a_proj.weight"] = torch.zeros(48, 64)  # a q-LoRA layer in a no-LoRA config
    return "model.layers.0.self_attn.q_a_proj.weight"


def _moe_checkpoint(sd):
    sd["model.layers.1.mlp.gate.weight"] = torch.zeros(8, 64)  # a router: this layer would be MoE
    return "model.layers.1.mlp.gate.weight"


@pytest.mark.parametrize(
    "corrupt",
    [_drop_key, _wrong_shape, _q_lora_checkpoint, _moe_checkpoint],
    ids=["missing", "shape", "unexpected-q-lora", "unexpected-moe-router"],
)
def test_mismatched_checkpoint_names_the_key(tiny_pair, corrupt):
    hf_sd = dict(tiny_pair[1].state_dict())
    named = corrupt(hf_sd)
    with pytest.raises(CheckpointMismatchError, match=named.replace("(", r"\(").replace(")", r"\)")):
        MLAModel.from_hf(hf_config(MLAConfig.from_name("tiny")), hf_sd)


def test_moe_config_is_refused():
    config = hf_config(MLAConfig.from_name("tiny"))
    config.first_k_dense_replace = 1  # layer 1 would be DeepSeekMoE
    with pytest.raises(ValueError, match="MoE layers"):
        MLAConfig.from_hf(config)


@pytest.mark.parametrize(
    "top_k, top_p", [(None, None), (50, None), (None, 0.9)], ids=["plain", "top-k", "top-p"]
)
def test_sampling_is_reproducible_with_a_seeded_generator(tiny_pair, top_k, top_p):
    ours = tiny_pair[0]
    prompt = random_tokens(ours.config, shape=(2, 3))
    runs = [
        ours.generate(
            prompt, 15, temperature=0.8, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(7)
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :3], prompt)


@pytest.mark.parametrize("name", list(name_to_config))
def test_hf_config_round_trip(name):
    cfg = MLAConfig.from_name(name)
    assert MLAConfig.from_hf(hf_config(cfg)) == cfg


def test_unknown_size_lists_known_names():
    with pytest.raises(ValueError, match="tiny, tiny-q-lora, deepseek-v2-lite-dense"):
        MLAConfig.from_name("deepseek-v3")


def test_v2_lite_dense_parameter_count_matches_hf():
    """No published count exists for an all-dense V2-Lite; check the arithmetic against HF on meta."""
    cfg = MLAConfig.from_name("deepseek-v2-lite-dense")
    with torch.device("meta"):  # shapes only: nothing is allocated
        ours, hf = MLAModel(cfg), transformers.DeepseekV2ForCausalLM(hf_config(cfg))
    attn = 2048 * 16 * 192 + 2048 * (512 + 64) + 512 + 512 * 16 * (128 + 128) + 16 * 128 * 2048
    layer = attn + 3 * 2048 * 10944 + 2 * 2048
    assert ours.num_params() == hf.num_parameters() == 27 * layer + 2 * 102400 * 2048 + 2048
    assert cfg.kv_floats_per_token == 27 * 576  # per-head keys and values would be 27 * 16 * (192 + 128)
