"""Parity of reproductions/transformer.py with transformers.MarianMTModel (tiny configs, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reproductions.common import CheckpointMismatchError
from reproductions.transformer import (
    Transformer,
    TransformerConfig,
    label_smoothed_nll,
    noam_lr,
    sinusoids,
)

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
BOS, EOS, PAD = 1, 2, 0


def hf_config(config: TransformerConfig, **ids):
    return transformers.MarianConfig(**config.to_hf_kwargs(**ids))

CONFIGS = {
    "tiny": TransformerConfig.from_name("tiny", dropout=0.0),
    # not registered: odd sizes (3 heads of 8, one layer, odd vocab) catch shape assumptions
    "unseen": TransformerConfig.from_name("tiny", d_model=24, n_head=3, n_layer=1, d_ff=40, vocab_size=37),
}


def random_marian(config: TransformerConfig, attn: str = "eager", seed: int = 0):
    """A MarianMTModel with every trainable tensor (biases and norms too) redrawn from a seeded normal."""
    marian_config = hf_config(config, bos_id=BOS, eos_id=EOS)
    marian_config._attn_implementation = attn
    torch.manual_seed(seed)
    hf = transformers.MarianMTModel(marian_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.requires_grad:  # not the frozen sinusoid tables
                centre = 1.0 if "layer_norm.weight" in name else 0.0
                p.copy_(centre + torch.randn_like(p) * (0.5 if p.ndim == 2 else 0.1))
    return hf


def pair(config: TransformerConfig, attn: str = "eager"):
    hf = random_marian(config, attn)
    ours = Transformer.from_hf(hf.config, hf.state_dict()).eval()
    return ours, hf


def batch(config: TransformerConfig, B: int = 3, S: int = 7, T: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, config.vocab_size, (B, S), generator=g)
    tgt = torch.randint(3, config.vocab_size, (B, T), generator=g)
    tgt[:, 0] = BOS
    lengths = torch.tensor([S, S - 2, 3][:B])  # right padding on the source
    src_mask = (torch.arange(S)[None, :] < lengths[:, None]).long()  # (B, S)
    src = src.masked_fill(src_mask == 0, PAD)
    return src, tgt, src_mask


def hf_logits(hf, src, tgt, src_mask):
    return hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS), ids=list(CONFIGS))
def test_logits_match_marian(name, attn):
    config = CONFIGS[name]
    ours, hf = pair(config, attn)
    src, tgt, src_mask = batch(config)
    with torch.no_grad():
        expected = hf_logits(hf, src, tgt, src_mask)
        got = ours(src, tgt, src_mask)
    assert got.shape == (3, 5, config.vocab_size)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS), ids=list(CONFIGS))
def test_gradients_match_marian(name):
    config = CONFIGS[name]
    ours, hf = pair(config)
    src, tgt, src_mask = batch(config)
    labels = torch.roll(tgt, -1, dims=1)
    label_smoothed_nll(ours(src, tgt, src_mask), labels).backward()
    label_smoothed_nll(hf_logits(hf, src, tgt, src_mask), labels).backward()
    hf_params = dict(hf.named_parameters())
    for name_, p in ours.named_parameters():
        hf_name = "model.shared.weight" if name_ == "shared.weight" else f"model.{name_}"
        torch.testing.assert_close(p.grad, hf_params[hf_name].grad, atol=ATOL, rtol=0, msg=name_)


def test_round_trip_loads_strictly_into_marian():
    config = CONFIGS["tiny"]
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    marian_config = hf_config(config, bos_id=BOS, eos_id=EOS)
    marian_config._attn_implementation = "eager"
    hf = transformers.MarianMTModel(marian_config).eval()
    hf.load_state_dict(ours.to_hf_state_dict(), strict=True)
    src, tgt, src_mask = batch(config)
    with torch.no_grad():
        expected, got = hf_logits(hf, src, tgt, src_mask), ours(src, tgt, src_mask)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS), ids=list(CONFIGS))
def test_cached_decoding_equals_full_decoding(name):
    config = CONFIGS[name]
    ours, _ = pair(config)
    src, tgt, src_mask = batch(config, T=6)
    with torch.no_grad():
        memory = ours.encode(src, src_mask)
        full = ours.decode(tgt, memory, src_mask)
        cache = ours.new_cache(src.size(0), tgt.size(1))
        first = ours.decode(tgt[:, :2], memory, src_mask, cache)  # a two-token prefix, then one at a time
        cross = [layer.cross_k for layer in cache.layers]
        steps = [ours.decode(tgt[:, t : t + 1], memory, src_mask, cache) for t in range(2, tgt.size(1))]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=ATOL, rtol=0)
    assert cache.length == tgt.size(1)
    assert all(layer.cross_k is k for layer, k in zip(cache.layers, cross))  # projected once, then reused


def marian_greedy(hf, src, src_mask, max_new_tokens, eos_id):
    return hf.generate(
        input_ids=src,
        attention_mask=src_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        decoder_start_token_id=BOS,
        eos_token_id=eos_id,
        pad_token_id=PAD,
    )


@pytest.mark.parametrize("name", list(CONFIGS), ids=list(CONFIGS))
def test_greedy_generate_matches_marian(name):
    config = CONFIGS[name]
    ours, hf = pair(config)
    src, _, src_mask = batch(config)
    no_eos = ours.generate(src, 8, bos_id=BOS, src_mask=src_mask)
    assert no_eos.shape == (3, 9)
    eos = int(no_eos[1, 2])  # row 1 stops by step 2; the others stop when they produce it, or never
    ours_out = ours.generate(src, 8, bos_id=BOS, eos_id=eos, src_mask=src_mask)
    assert torch.equal(ours_out, marian_greedy(hf, src, src_mask, 8, eos))
    for row in ours_out.tolist():
        if eos in row[1:]:
            after = row[row.index(eos, 1) + 1 :]
            assert after == [PAD] * len(after)  # finished rows are padded, as in transformers


def test_sampling_is_seeded():
    ours, _ = pair(CONFIGS["tiny"])
    src, _, src_mask = batch(CONFIGS["tiny"])
    draw = lambda: ours.generate(
        src, 6, BOS, temperature=1.0, top_k=10, src_mask=src_mask, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(draw(), draw())


def test_mismatched_checkpoint_is_refused():
    config = CONFIGS["tiny"]
    sd = random_marian(config).state_dict()
    wider = TransformerConfig.from_name("tiny", d_model=48)
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        Transformer.from_hf(hf_config(wider), sd)
    del sd["model.decoder.layers.1.fc2.bias"]
    with pytest.raises(CheckpointMismatchError, match="missing keys.*fc2.bias"):
        Transformer.from_hf(hf_config(config), sd)
    sd = random_marian(config).state_dict()
    sd["final_logits_bias"] = torch.ones_like(sd["final_logits_bias"])
    with pytest.raises(CheckpointMismatchError, match="final_logits_bias"):
        Transformer.from_hf(hf_config(config), sd)


def test_marian_configs_it_does_not_compute_are_refused():
    with pytest.raises(ValueError, match="activation_function != relu"):
        TransformerConfig.from_hf(transformers.MarianConfig(activation_function="swish"))
    untied = hf_config(CONFIGS["tiny"])
    untied.share_encoder_decoder_embeddings = False
    with pytest.raises(ValueError, match="untied embeddings"):
        TransformerConfig.from_hf(untied)


def test_positions_match_marian_layout():
    hf = random_marian(CONFIGS["unseen"])
    for side in (hf.model.encoder, hf.model.decoder):
        torch.testing.assert_close(sinusoids(64, 24), side.embed_positions.weight, atol=0, rtol=0)
    table, pos = sinusoids(10, 8), torch.arange(10, dtype=torch.float64)
    assert torch.equal(table[:, 0], torch.sin(pos).float())  # i = 0: sin(pos) first, cos(pos) at d/2
    assert torch.equal(table[:, 4], torch.cos(pos).float())
    assert torch.equal(table[:, 1], torch.sin(pos / 10000 ** (2 / 8)).float())


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # Marian's frozen sinusoids excluded


@pytest.mark.parametrize(("name", "paper"), [("base", 65e6), ("big", 213e6)], ids=["base", "big"])
def test_parameter_count_matches_marian_and_paper(name, paper):
    config = TransformerConfig.from_name(name)
    with torch.device("meta"):
        ours = Transformer(config)
        hf = transformers.MarianMTModel(hf_config(config))
    assert param_count(ours) == param_count(hf)
    assert abs(param_count(ours) - paper) / paper < 0.04  # Table 3; we assume a 37000-token vocabulary


def test_unseen_config_parameter_count():
    config = CONFIGS["unseen"]
    d, ff, V = 24, 40, 37
    attn, ln, ffn = 4 * (d * d + d), 2 * d, d * ff + ff + ff * d + d
    expected = V * d + (attn + ffn + 2 * ln) + (2 * attn + ffn + 3 * ln)
    assert param_count(Transformer(config)) == expected


def test_label_smoothing_matches_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    target = torch.randint(0, 11, (2, 5), generator=g)
    target[1, 3:] = -100
    expected = F.cross_entropy(logits.view(-1, 11), target.view(-1), label_smoothing=0.1, ignore_index=-100)
    torch.testing.assert_close(label_smoothed_nll(logits, target, eps=0.1), expected, atol=ATOL, rtol=0)
    plain = F.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=-100)
    torch.testing.assert_close(label_smoothed_nll(logits, target, eps=0.0), plain, atol=ATOL, rtol=0)


def test_noam_schedule():
    peak = 512**-0.5 * 4000**-0.5
    assert noam_lr(0) == 0.0
    assert noam_lr(4000) == pytest.approx(peak)
    assert noam_lr(2000) == pytest.approx(peak / 2)  # linear warm-up
    assert noam_lr(16000) == pytest.approx(peak / 2)  # then 1 / sqrt(step)
    assert max(noam_lr(s) for s in range(1, 20000, 50)) <= peak


def test_from_name():
    assert TransformerConfig.from_name("base").d_model == 512
    big = TransformerConfig.from_name("big")
    assert (big.d_model, big.n_head, big.d_ff, big.dropout) == (1024, 16, 4096, 0.3)
    with pytest.raises(ValueError, match="base, big, tiny"):
        TransformerConfig.from_name("huge")
    with pytest.raises(ValueError, match="unknown config fields"):
        TransformerConfig.from_name("tiny", n_heads=2)
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig.from_name("tiny", n_head=5)
