import torch

from harness.api import MODELS, load_plugins, load_weights

load_plugins()


def _pair():
    spec = MODELS.get("gpt2-hf")
    weights = load_weights(spec.arch, "random:tiny", seed=0)
    eot = weights.tokenizer.eot_id
    row = weights.state_dict["transformer.wte.weight"][eot]
    # a final-LayerNorm bias along the <|endoftext|> embedding adds +50 to its logit: it wins everywhere
    weights.state_dict["transformer.ln_f.bias"] = 50 * row / row.norm() ** 2
    return MODELS.get("gpt2-scratch").build(weights, "cpu"), spec.build(weights, "cpu"), eot


def test_generation_does_not_stop_at_end_of_text():
    scratch, hf, eot = _pair()
    prompt = scratch.tokenizer.encode("Hello world")
    ours, theirs = scratch.generate(prompt, 5), hf.generate(prompt, 5)
    assert len(ours) == len(theirs) == 5
    assert ours == theirs
    assert eot in theirs


def test_sampling_is_reproducible_from_the_seed():
    scratch, hf, _ = _pair()
    prompt = scratch.tokenizer.encode("Once upon a time")
    for model in (scratch, hf):
        a = model.generate(prompt, 8, temperature=1.0, top_k=50, seed=3)
        b = model.generate(prompt, 8, temperature=1.0, top_k=50, seed=3)
        assert a == b and len(a) == 8


def test_token_logprobs_are_normalised():
    scratch, _, _ = _pair()
    ids = torch.tensor([[1, 2, 3, 4]])
    logits = scratch.logits(ids)
    assert torch.allclose(logits.log_softmax(-1).exp().sum(-1), torch.ones(1, 4), atol=1e-5)
    lp = scratch.token_logprobs(ids[:, :-1], ids[:, 1:])
    assert lp.shape == (1, 3) and (lp <= 0).all()


def test_prefill_forward_pads_the_head_and_keeps_the_logits():
    """GPT-2's 50,257-token head runs as an aligned 50,304 copy without gradients (harness.api.heads):
    the reference's logits to 1e-5, a (B, T, vocab) result, and (like the decode copy) the current weights
    after a fused AdamW step, which does not bump the parameters' version counters."""
    from harness.api.heads import MIN_ROWS

    scratch, hf, _ = _pair()
    ids = torch.randint(50257, (MIN_ROWS // 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = scratch.forward(scratch.module, ids)
        assert fast.shape == (*ids.shape, 50257) and fast.stride(-2) == 50304  # the padded GEMM ran
        torch.testing.assert_close(fast, hf.forward(hf.module, ids), atol=1e-5, rtol=0)
    opt = torch.optim.AdamW(scratch.module.parameters(), lr=1e-2, fused=True)
    scratch.module(ids[:, :8]).logsumexp(-1).mean().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(scratch.forward(scratch.module, ids), scratch.module(ids), atol=1e-5, rtol=0)
    assert scratch.forward(scratch.module, ids).requires_grad  # with gradients: the module itself


def test_the_decode_copy_follows_a_fused_adamw_step():
    spec = MODELS.get("gpt2-scratch")
    scratch = spec.build(load_weights(spec.arch, "random:tiny", seed=0), "cpu")
    prompt = torch.tensor([[1, 2, 3, 4]])
    before = scratch.generate_batch(prompt, 6)  # builds the input-major decode copy
    opt = torch.optim.AdamW(scratch.module.parameters(), lr=1.0, fused=True)
    scratch.module(prompt).logsumexp(-1).mean().backward()
    opt.step()
    with torch.no_grad():
        want = scratch.module.generate(prompt, 6, temperature=0.0)
    assert not torch.equal(want, before)  # the step changed what greedy decoding picks
    assert torch.equal(scratch.generate_batch(prompt, 6), want)
