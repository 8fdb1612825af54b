"""GPT-1 from scratch against transformers' OpenAIGPTLMHeadModel: same weights, same numbers.

fp32 on CPU, atol 1e-5 and rtol 0 everywhere. `make_pair` redraws HF's random weights with
std 0.05 (HF: 0.02, under which logits barely depend on the activation's shape) and moves
LayerNorm gains and biases off 1 and 0. Measured max |diff| on the tiny configs: logits 5e-7,
gradients 6e-8, cached vs uncached 5e-7. Slips it catches, measured the same way: the exact
erf GELU instead of the tanh one moves logits by 7e-5, pre-LN instead of post-LN by ~2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reproductions.common import CheckpointMismatchError
from reproductions.gpt1 import GPT1, GPT1Config, KVCache, name_to_config

transformers = pytest.importorskip("transformers")


def hf_config(cfg: GPT1Config):
    return transformers.OpenAIGPTConfig(**cfg.to_hf_kwargs())

ATOL = 1e-5
INIT_STD = 0.05  # 2.5x HF's 0.02: sharper attention, GELU/SiLU off their linear range, so slips show
CONFIGS = [
    pytest.param(GPT1Config.from_name("tiny"), id="tiny"),
    # nothing hard-coded: other vocab, context, depth, width, head count and epsilon
    pytest.param(
        GPT1Config.from_name(
            "tiny", vocab_size=517, block_size=48, n_layer=3, n_head=6, n_embd=48, layer_norm_eps=1e-6
        ),
        id="unseen-6heads-3layers",
    ),
]


def make_pair(cfg: GPT1Config, seed: int = 0) -> tuple[GPT1, torch.nn.Module]:
    """A seeded random HF GPT-1 and our model holding the same weights, both in eval mode."""
    torch.manual_seed(seed)
    hf = transformers.OpenAIGPTLMHeadModel(hf_config(cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:  # LayerNorm gains/biases and Linear biases
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, INIT_STD)
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return GPT1.from_hf(hf.config, hf.state_dict()).eval(), hf


def random_tokens(cfg: GPT1Config, shape=(2, 16), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_pair():
    return make_pair(GPT1Config.from_name("tiny"))


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
def test_cached_logits_match_uncached(cfg):
    ours = make_pair(cfg)[0]
    idx = random_tokens(cfg, shape=(2, 12))
    full = ours(idx)  # (B, T, V)
    cache = KVCache(cfg, batch_size=2, max_len=12)
    torch.testing.assert_close(ours(idx[:, :4], kv_cache=cache), full[:, :4], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(idx[:, 4:7], kv_cache=cache), full[:, 4:7], atol=ATOL, rtol=0)
    for t in range(7, 12):
        step = ours(idx[:, t : t + 1], kv_cache=cache)  # (B, 1, V)
        torch.testing.assert_close(step, full[:, t : t + 1], atol=ATOL, rtol=0, msg=f"position {t}")
    assert cache.pos == 12


def test_state_dict_round_trip(tiny_pair):
    ours, hf = tiny_pair
    hf_sd, sd = hf.state_dict(), ours.state_dict()
    back_to_hf = GPT1.from_hf(hf.config, hf_sd).to_hf_state_dict()
    back_to_ours = GPT1.from_hf(hf.config, ours.to_hf_state_dict()).state_dict()
    assert back_to_hf.keys() == hf_sd.keys() and back_to_ours.keys() == sd.keys()
    for k in hf_sd:
        torch.testing.assert_close(back_to_hf[k], hf_sd[k], atol=0, rtol=0, msg=k)
    for k in sd:
        torch.testing.assert_close(back_to_ours[k], sd[k], atol=0, rtol=0, msg=k)


def test_hub_style_checkpoint_loads(tiny_pair):
    """Hub files of the bare OpenAIGPTModel have no `transformer.` prefix and no lm_head."""
    ours, hf = tiny_pair
    hub_sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    loaded = GPT1.from_hf(hf.config, hub_sd)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0, msg=k)


def _drop_key(sd):
    del sd["transformer.h.1.mlp.c_fc.bias"]
    return "transformer.h.1.mlp.c_fc.bias"


def _wrong_shape(sd):
    sd["transformer.h.0.attn.c_attn.weight"] = torch.zeros(64, 190)
    return "transformer.h.0.attn.c_attn.weight (64, 190) != (64, 192)"


def _extra_key(sd):
    sd["transformer.ln_f.weight"] = torch.ones(64)  # a GPT-2 checkpoint has a final LayerNorm
    return "transformer.ln_f.weight"


@pytest.mark.parametrize(
    "corrupt", [_drop_key, _wrong_shape, _extra_key], ids=["missing", "shape", "unexpected"]
)
def test_mismatched_checkpoint_names_the_key(tiny_pair, corrupt):
    hf_sd = dict(tiny_pair[1].state_dict())
    named = corrupt(hf_sd)
    with pytest.raises(CheckpointMismatchError, match=named.replace("(", r"\(").replace(")", r"\)")):
        GPT1.from_hf(hf_config(GPT1Config.from_name("tiny")), hf_sd)


def test_untied_head_is_rejected(tiny_pair):
    hf_sd = dict(tiny_pair[1].state_dict())
    hf_sd["lm_head.weight"] = torch.zeros_like(hf_sd["lm_head.weight"])
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        GPT1.from_hf(tiny_pair[1].config, hf_sd)


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


def test_generate_refuses_to_exceed_block_size(tiny_pair):
    ours = tiny_pair[0]
    with pytest.raises(ValueError, match="block_size 64"):
        ours.generate(random_tokens(ours.config, shape=(1, 60)), max_new_tokens=5)


@pytest.mark.parametrize("name", list(name_to_config))
def test_hf_config_round_trip(name):
    cfg = GPT1Config.from_name(name)
    assert GPT1Config.from_hf(hf_config(cfg)) == cfg


def test_unknown_size_lists_known_names():
    with pytest.raises(ValueError, match="tiny, gpt1"):
        GPT1Config.from_name("gpt-1")


def test_parameter_count_matches_published_117m():
    cfg = GPT1Config.from_name("gpt1")
    with torch.device("meta"):  # shapes only: nothing is allocated
        ours, hf = GPT1(cfg), transformers.OpenAIGPTLMHeadModel(hf_config(cfg))
    assert ours.num_params() == hf.num_parameters() == 116_534_784  # the paper's "117M"


@pytest.mark.slow
@torch.no_grad()
def test_real_gpt1_size_logits_match_hf():
    cfg = GPT1Config.from_name("gpt1")
    ours, hf = make_pair(cfg)
    idx = random_tokens(cfg, shape=(2, 64))
    torch.testing.assert_close(ours(idx), hf(idx).logits, atol=ATOL, rtol=0)
