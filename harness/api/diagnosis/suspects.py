"""The catalogue of causes, each in words with its fix, and the ranking of suspects from the evidence."""

from __future__ import annotations

from dataclasses import dataclass

from harness.api.diagnosis.probes import Evidence


@dataclass(frozen=True)
class Suspect:
    key: str
    score: float
    text: str

    def __str__(self) -> str:
        return self.text


CATALOGUE: dict[str, str] = {
    "gelu": "GELU variant: the MLP's GELU is the exact (erf) form where the reference uses the tanh "
            "approximation, or the reverse (differences near 1e-4 relative). Fix: GPT-2 uses "
            "F.gelu(x, approximate='tanh') ('gelu_new'); BERT uses the exact F.gelu(x).",
    "causal_mask": "causal mask missing: positions see later tokens (changing the last token moves earlier "
                   "outputs; the last position and T = 1 agree). Fix: mask future keys, e.g. "
                   "F.scaled_dot_product_attention(q, k, v, is_causal=True).",
    "softmax_axis": "softmax over the wrong axis: attention weights are normalised over queries, not keys "
                    "(rows do not sum to 1; earlier outputs depend on later queries). Fix: softmax(scores, dim=-1).",
    "softmax_scale": "softmax scale: attention scores are scaled by the wrong factor ({note}); T = 1 and "
                     "position 0 agree. Fix: scores * head_size ** -0.5, with head_size = n_embd // n_head.",
    "position_ids": "position ids: the position embeddings are read at the wrong positions ({note}). Fix: "
                    "positions = torch.arange(start, start + T), starting at 0.",
    "token_types": "token types ignored: the segment (token_type) embeddings are not added. Fix: "
                   "x = word + position + token_type_embeddings(token_type_ids).",
    "padding_mask": "padding mask ignored: real tokens attend to padding keys (only padded sequences "
                    "differ). Fix: pass attention_mask as a key mask (mask[:, None, None, :]) to the attention.",
    "final_norm": "final norm: the norm after the last block is skipped or wrong (the blocks agree, the "
                  "LM head's input does not). Fix: apply ln_f / norm to the last block's output before the head.",
    "head_tying": "head tying: the output head is not tied to the token embedding (blocks and final norm "
                  "agree, logits do not). Fix: self.lm_head.weight = self.wte.weight.",
    "residual": "residual dropped: a block returns a branch without adding its input back (x = f(x) "
                "instead of x = x + f(x)). Fix: restore the residual add in the marked block.",
    "norm_eps": "LayerNorm/RMSNorm eps differs from the reference's ({note}). Fix: use the config's "
                "epsilon (GPT-2 1e-5, BERT 1e-12, Llama rms_norm_eps).",
    "rmsnorm_weight": "norm without its weight: the norm's learned scale (RMSNorm/LayerNorm weight) is not "
                      "applied. Fix: return self.weight * normed.",
    "norm_placement": "pre-LN vs post-LN: the attention reads the raw residual stream, so the norm comes after "
                      "the residual add instead of before the branch. Fix (GPT-2, Llama): "
                      "x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)).",
    "rope_pairing": "RoPE pairing: rotary embeddings rotate adjacent pairs (x[2i], x[2i+1]) where the "
                    "reference rotates halves (x[i], x[i + hs/2]), or the reverse (position 0 and T = 1 agree). "
                    "Fix: rotate_half layout, x * cos + cat(-x2, x1) * sin, or permute q/k weights.",
    "gqa_repeat": "GQA head repetition: query heads are matched to the wrong key/value heads (wrong even for "
                  "one token). Fix: k.repeat_interleave(n_head // n_kv_head, dim=1), not k.repeat(...).",
    "backward": "backward only: every forward site agrees but gradients differ from {note} on: a detach(), "
                "torch.no_grad(), an in-place op or a custom autograd Function cuts or changes the graph there. "
                "Fix: compute the branch with autograd enabled and without .detach().",
    "attention": "attention computation differs (the attention module alone, fed the reference's input, "
                 "disagrees): check q/k/v split, head reshape, mask and scale.",
    "mlp": "MLP computation differs (the MLP alone, fed the reference's input, disagrees): check the "
           "activation, widths and projections.",
}


def _signature_scores(ev: Evidence, bidirectional: bool) -> dict[str, float]:
    """Prior scores in [0, 1] from the probes, before counterfactuals."""
    s: dict[str, float] = {}
    site, iso = ev.site, ev.isolated_diverges
    if site == "attn":
        if ev.leaks:
            s["causal_mask"] = 0.9 if ev.last_ok and not ev.t1_diverges else 0.3
            s["softmax_axis"] = 0.8 if not ev.last_ok else 0.2
        if ev.t1_diverges is False and ev.pos0_ok and not ev.leaks:
            s["softmax_scale"] = 0.5
            if ev.rope:
                s["rope_pairing"] = 0.5
        if ev.t1_diverges is False and not ev.pos0_ok and not ev.leaks:
            s["softmax_axis"] = max(s.get("softmax_axis", 0), 0.3)
        if ev.gqa and ev.t1_diverges and iso is not False:
            s["gqa_repeat"] = 0.8
        if ev.padded_rows_only:
            s["padding_mask"] = 0.8
        if iso is False or ev.reads_raw_stream:
            s["norm_placement"] = 0.95 if ev.reads_raw_stream else 0.2
            s["norm_eps"] = 0.3
            s["rmsnorm_weight"] = 0.3
        elif iso:
            s["attention"] = 0.1
    if site == "mlp":
        s["gelu"] = 0.6 if ev.rel_diff < 1e-2 else 0.3
        if iso is False:
            s["norm_eps"], s["rmsnorm_weight"] = 0.3, 0.3
        s["mlp"] = 0.1
    if site == "block" or (site == "mlp" and ev.residual_dropped):
        s["residual"] = 0.95 if ev.residual_dropped else 0.5
    if site == "embed":
        s["position_ids"] = 0.4 if not bidirectional or ev.grows else 0.3
        if bidirectional:
            s["token_types"] = 0.3
            s["norm_eps"] = 0.2
    if site == "final_norm":
        s["final_norm"] = 0.6
        s["norm_eps"] = 0.2
    if site == "logits":
        s["head_tying"] = 0.95 if ev.head_untied else 0.4
    if ev.eps_mismatch:
        s["norm_eps"] = s.get("norm_eps", 0) + 0.6
    return s


def rank(ev: Evidence, bidirectional: bool) -> list[Suspect]:
    """Signature scores, plus 2 for a counterfactual that reproduces ours (the difference shrinks at least
    100x), or the fraction of the difference it explains when that is at least half."""
    scores = _signature_scores(ev, bidirectional)
    for key, ratio in ev.counterfactuals.items():
        explained = 2.0 if ratio <= 1e-2 else 1.0 - ratio
        if explained >= 0.5:  # explains at least half the difference
            scores[key] = scores.get(key, 0.0) + explained
    out = []
    for key, score in sorted(scores.items(), key=lambda kv: -kv[1]):
        note = ev.counterfactual_notes.get(key, "")
        if key == "norm_eps" and ev.eps_mismatch:
            note = ev.eps_mismatch
        text = CATALOGUE[key].replace("{note}", note or "see the probe")
        confirmed = ev.counterfactuals.get(key, 1.0) <= 1e-2
        out.append(Suspect(key, round(score, 3), ("[confirmed] " if confirmed else "") + text))
    return out
