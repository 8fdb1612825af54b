"""Reinforcement learning on language models: PPO, GRPO, RLOO and DPO, as losses on log-probabilities.

One file, torch only. A policy is any causal LM; everything here works on what it produces:
per-token log-probabilities of sampled completion tokens, `logp` (B, T), a 0/1 `mask` (B, T) of the
tokens that count, and one scalar reward per completion, `rewards` (B,).

* PPO -- Schulman, Wolski, Dhariwal, Radford & Klimov 2017, "Proximal Policy Optimization
  Algorithms" (arXiv:1707.06347): the clipped surrogate, eq. (7),
  ``L = -E[min(r A, clip(r, 1-eps, 1+eps) A)]`` with ``r = pi(a|s) / pi_old(a|s)``; advantages by
  generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
  Generalized Advantage Estimation", arXiv:1506.02438), ``delta_t = r_t + gamma V_{t+1} - V_t``,
  ``A_t = sum_l (gamma lambda)^l delta_{t+l}``; a value head trained with a clipped value loss; and,
  as in RLHF (Ziegler et al. 2019, arXiv:1909.08593; Ouyang et al. 2022), a per-token KL penalty
  ``-kl_coef (log pi - log pi_ref)`` added to the reward, the task's score on the last token.
* GRPO -- Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300), sec. 4.1: no value model; each prompt
  gets G completions and the advantage of completion i is its reward normalised within the group,
  ``(r_i - mean(r)) / std(r)``, given to every token; the KL to the reference is added to the loss
  with the unbiased, always-positive estimator of Schulman 2020 ("Approximating KL Divergence",
  http://joschu.net/blog/kl-approx.html), "k3": ``exp(ref - logp) - (ref - logp) - 1``.
* RLOO -- Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
  from Human Feedback in LLMs" (arXiv:2402.14740): each completion's baseline is the mean reward of
  the *other* k-1 completions of its prompt, ``A_i = r_i - (sum_j r_j - r_i) / (k - 1)``; the whole
  completion is one action, and the KL enters the reward as the summed log-ratio (k1).
* DPO -- Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290), eq. (7): for a
  preferred completion y_w and a dispreferred y_l of the same prompt,
  ``L = -log sigmoid(beta [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])``.

Where TRL offers several choices (https://huggingface.co/docs/trl, version 1.16: GRPOTrainer,
RLOOTrainer, DPOTrainer), the functions below take TRL's names and defaults, so the same numbers can
be held to TRL's code: GRPO's `loss_type` ("grpo", "bnpo", "dr_grpo", "dapo") only changes how
per-token losses are averaged, `scale_rewards` ("group", "batch", "none") how rewards are scaled, the
standard deviation is Bessel-corrected and the denominator is ``std + 1e-4``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

STD_EPS = 1e-4  # TRL adds this to the group standard deviation (GRPOTrainer, RLOOTrainer)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


# ---- what the losses are computed on -----------------------------------------------------------------
@dataclass(frozen=True)
class Rollout:
    """Completions sampled from the policy, G consecutive rows per prompt, and their scalar rewards."""

    prompt_ids: torch.Tensor  # (B, P) int64
    completion_ids: torch.Tensor  # (B, C) int64
    rewards: torch.Tensor  # (B,) float32
    completion_mask: torch.Tensor | None = None  # (B, C) 1 = a real token (right padding); None = all real

    @property
    def ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # (B, P+C)

    @property
    def mask(self) -> torch.Tensor:
        if self.completion_mask is None:
            return torch.ones_like(self.completion_ids, dtype=torch.float32)
        return self.completion_mask.float()


@dataclass(frozen=True)
class Preferences:
    """Pairs of completions of the same prompts, the first preferred (DPO)."""

    prompt_ids: torch.Tensor  # (B, P)
    chosen_ids: torch.Tensor  # (B, C)
    rejected_ids: torch.Tensor  # (B, C)


# ---- log-probabilities ------------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(tokens[b, t]) under logits[b, t] (already aligned: logits at t score token t), (B, T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def completion_logprobs(logits: torch.Tensor, ids: torch.Tensor, prompt_len: int,
                        temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probabilities (B, C) of the completion ids[:, prompt_len:] under a causal LM's
    logits (B, P+C, V) of the whole sequence: position t-1 scores token t."""
    return token_logprobs(logits[:, prompt_len - 1 : -1], ids[:, prompt_len:], temperature)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (all of them, or along `dim`); empty rows count 1."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def std_bessel(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Standard deviation with Bessel's correction (n - 1), as TRL's `nanstd` (without NaNs)."""
    return x.std(dim=dim, unbiased=True, keepdim=keepdim) if dim is not None else x.std(unbiased=True)


# ---- the KL to the reference --------------------------------------------------------------------------
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log pi - log pi_ref per token: unbiased for KL(pi || pi_ref) on samples of pi, but any sign."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 per token, exp(ref - logp) - (ref - logp) - 1: unbiased on samples of pi and >= 0
    (x - 1 - log x >= 0 with x = pi_ref / pi). What GRPO adds to its loss (DeepSeekMath eq. 4)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


# ---- the clipped ratio (PPO eq. 7) -------------------------------------------------------------------
def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float = 0.2, eps_high: float | None = None) -> torch.Tensor:
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), elementwise, r = exp(logp - old_logp).

    Where the clip is active the gradient is zero: the update gains nothing from moving r further
    than 1 +- eps in the direction the advantage favours."""
    eps_high = eps_low if eps_high is None else eps_high
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return -torch.min(ratio * advantages, clipped * advantages)


# ---- GRPO ----------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """(r - mean of its group) / (std + 1e-4), rewards (B,) in consecutive groups of `group_size`.

    scale: "group" divides by each group's std (DeepSeekMath), "batch" by the whole batch's std,
    "none" not at all (Dr. GRPO, Liu et al. 2025)."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {SCALE_REWARDS}, got {scale!r}")
    grouped = rewards.view(-1, group_size)  # (prompts, G)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    std = std_bessel(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1) if scale == "group" \
        else std_bessel(rewards).expand_as(rewards)
    return centred / (std + STD_EPS)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo",
              max_completion_length: int | None = None) -> torch.Tensor:
    """One loss from per-token losses (B, T), as TRL's GRPO `loss_type` (one process, no accumulation):

    grpo     mean over sequences of each sequence's token mean (DeepSeekMath eq. 3);
    bnpo     token mean over the batch;
    dapo     token mean over the generation batch (Yu et al. 2025, DAPO) -- the same as bnpo here;
    dr_grpo  token sum / (B x max_completion_length), a constant (Liu et al. 2025, Dr. GRPO)."""
    if loss_type == "grpo":
        return masked_mean(per_token, mask, dim=1).mean()
    if loss_type in ("bnpo", "dapo"):
        return masked_mean(per_token, mask)
    if loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else per_token.shape[1]
        return (per_token * mask).sum() / (per_token.shape[0] * length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


@dataclass(frozen=True)
class GRPOConfig:
    beta: float = 0.04  # KL coefficient (TRL's default is 0.0: no reference model)
    epsilon: float = 0.2  # clip range, low side
    epsilon_high: float | None = None  # high side (DAPO's clip-higher); None = epsilon
    loss_type: str = "dapo"  # TRL 1.16's default
    scale_rewards: str = "group"
    max_completion_length: int | None = None  # dr_grpo's constant (None: the batch's width)
    kl_ratio_correction: bool = True  # KL x the ratio (DeepSeek-V3.2; TRL 1.16's use_bias_correction_kl default)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """GRPO (DeepSeekMath eq. 3): the clipped surrogate per token with the sequence's advantage, plus
    beta x k3 KL to the reference, averaged by `cfg.loss_type`.

    With `kl_ratio_correction` the KL term is weighted by the (differentiable) ratio pi / pi_old, which
    makes its gradient the unbiased reverse-KL gradient on samples of pi_old (DeepSeek-AI 2025,
    "DeepSeek-V3.2", eq. 8); it changes the gradient even on-policy, where the ratio is 1."""
    per_token = clipped_surrogate(logp, old_logp, advantages[:, None], cfg.epsilon, cfg.epsilon_high)
    if cfg.beta != 0.0:
        kl = kl_k3(logp, ref_logp)
        if cfg.kl_ratio_correction:
            kl = kl * torch.exp(logp - old_logp)
        per_token = per_token + cfg.beta * kl
    return aggregate(per_token, mask, cfg.loss_type, cfg.max_completion_length)


# ---- RLOO ----------------------------------------------------------------------------------------------
def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """r_i - mean of the other k-1 rewards of the same prompt (Ahmadian et al. 2024, eq. 6), (B,)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt")
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


@dataclass(frozen=True)
class RLOOConfig:
    beta: float = 0.05  # KL coefficient, in the reward (TRL's default)
    epsilon: float = 0.2
    epsilon_high: float | None = None
    normalize_advantages: bool = False  # TRL: (A - mean) / (std + 1e-4) over the batch


def rloo_advantages(rewards: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                    mask: torch.Tensor, group_size: int, cfg: RLOOConfig) -> torch.Tensor:
    """Rewards minus beta x the summed k1 KL of each completion (the policy that sampled it against the
    reference), then the leave-one-out baseline, then (optionally) batch normalisation."""
    if cfg.beta != 0.0:
        rewards = rewards - cfg.beta * (kl_k1(old_logp, ref_logp) * mask).sum(-1)
    adv = leave_one_out_advantages(rewards, group_size)
    return (adv - adv.mean()) / (std_bessel(adv) + STD_EPS) if cfg.normalize_advantages else adv


def rloo_loss(logp: torch.Tensor, old_seq_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              cfg: RLOOConfig) -> torch.Tensor:
    """The whole completion is one action: the clipped surrogate on the sequence ratio
    exp(sum logp - sum old_logp), averaged over completions."""
    seq_logp = (logp * mask).sum(-1)
    return clipped_surrogate(seq_logp, old_seq_logp, advantages, cfg.epsilon, cfg.epsilon_high).mean()


# ---- DPO -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1  # strength of the implicit KL constraint (TRL's default)


def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Rafailov et al. 2023 eq. (7), the sigmoid loss, on summed completion log-probabilities (B,)."""
    margin = (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)
    return -F.logsigmoid(beta * margin).mean()


# ---- PPO -----------------------------------------------------------------------------------------------
class ValueHead(nn.Module):
    """V(s_t) from the policy's last hidden state: one linear layer, as in Ziegler et al. 2019."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.summary = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.summary.weight)  # start at V = 0: no opinion before the first update
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden).squeeze(-1)  # (B, T, C) -> (B, T)


def kl_penalized_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef (log pi - log pi_ref) on every token, plus the sequence's
    score on its last real token (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2)."""
    rewards = -kl_coef * kl_k1(logp, ref_logp) * mask
    last = mask.sum(-1).long().clamp(min=1) - 1  # index of each row's last real token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over each row's tokens, the
    episode ending after its last real token (V = 0 beyond it). Returns (advantages, returns), (B, T),
    returns = advantages + values (the value targets, "lambda-returns")."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries (PPO's advantage normalisation)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float = 0.2) -> torch.Tensor:
    """0.5 E[max((V - R)^2, (clip(V, V_old +- clip) - R)^2)]: the value may not move further than
    `clip` from the value at sampling time in one update (the OpenAI baselines ppo2 rule)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


@dataclass(frozen=True)
class PPOConfig:
    kl_coef: float = 0.05  # per-token KL penalty in the reward
    gamma: float = 1.0
    lam: float = 0.95
    epsilon: float = 0.2  # policy clip
    value_clip: float = 0.2
    vf_coef: float = 0.5  # weight of the value loss


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cfg: PPOConfig) -> torch.Tensor:
    """PPO's objective (Schulman et al. 2017 eq. 9 without the entropy bonus): the clipped surrogate
    per token plus vf_coef x the clipped value loss."""
    policy = masked_mean(clipped_surrogate(logp, old_logp, advantages, cfg.epsilon), mask)
    return policy + cfg.vf_coef * clipped_value_loss(values, old_values, returns, mask, cfg.value_clip)
