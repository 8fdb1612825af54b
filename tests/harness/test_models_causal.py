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
    the reference's logits to 1e-5, a (B, T, vocab) result, and a fresh copy after a weight update."""
    scratch, hf, _ = _pair()
    ids = torch.randint(50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = scratch.forward(scratch.module, ids)
        assert fast.shape == (2, 12, 50257)
        torch.testing.assert_close(fast, hf.forward(hf.module, ids), atol=1e-5, rtol=0)
        scratch.module.lm_head.weight.mul_(2)  # an in-place update, as an optimiser step makes
        torch.testing.assert_close(scratch.forward(scratch.module, ids), scratch.module(ids), atol=1e-5, rtol=0)
    with torch.enable_grad():
        assert scratch.forward(scratch.module, ids).requires_grad  # training goes through the module itself
