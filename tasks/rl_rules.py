"""Task `rl-rules`: RL fine-tuning of a char GPT with the rule validator as the reward.

A rule language of order N (tasks/ngram_rules_lang.py) has an exact, cheap validator: every symbol
after the first N-1 must lie in the allowed set of the N-1 before it. The task

1. pretrains a fresh char GPT (the `RLLoss` adapter's `new_policy`, the same seeded init for a scratch
   model and its TRL reference) briefly on valid sequences, so that it samples valid sequences only
   part of the time (`pretrain_steps` is set for a valid rate of about 0.3-0.6);
2. fine-tunes a copy of it with the model's algorithm (GRPO, RLOO, PPO: online, on its own samples,
   `group_size` completions per prompt, the reward below; DPO: offline, on pairs of a valid and an
   invalid completion of the same prompt sampled from the pretrained policy), the pretrained policy
   being the frozen reference;
3. samples one completion of each of `eval_samples` prompts (drawn with their own seed; short prompts
   repeat the training ones) before and after, with the same seeds.

Reward (`reward`): "token_fraction" = the share of the completion's constrained symbols that obey
the rule, or "valid" = 1 if the whole sequence does. Metrics:

- `valid_rate_before`, `valid_rate_after`: share of fully valid sampled sequences (bootstrap 95%
  interval in extra.ci_low / ci_high; stderr = the bootstrap standard deviation);
- `reward_mean`: the mean reward of the evaluation samples after training; extra.reward_curve is
  the mean reward of the samples drawn at every step (the training rollouts; for DPO a fresh batch);
- `kl_to_ref`: exact KL(pi || pi_ref) per completion token, summed over the vocabulary and averaged
  over the evaluation samples of the trained policy.

Every seed (rules, pretraining data, init, prompts, sampling, DPO pairs) derives from `--seed` and
not from the model, so a scratch model and its TRL reference see the same prompts with the same
random streams. Their trajectories still drift apart (rounding differences flip a sampled token now
and then), so the pair is compared within the bootstrap intervals, not exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from harness.api import (
    TASKS,
    Capability,
    HarnessError,
    Metric,
    MetricSpec,
    ModelAdapter,
    Recipe,
    RunContext,
    Task,
    torch_threads,
)
from harness.api.capabilities import RLLoss, RLSession
from reproductions import rl
from tasks.ngram_rules import derive_seed
from tasks.ngram_rules_lang import RuleLanguage, RuleSpec

REWARDS = ("token_fraction", "valid")


@dataclass(frozen=True)
class RLRulesConfig:
    n: int = 3  # rule order N
    vocab: int = 4  # V
    allowed: int = 2  # k
    seq_len: int = 16  # L symbols, prompt included
    prompt_len: int = 4  # P symbols of a valid sequence given as the prompt (>= N-1)
    pretrain_samples: int = 2000
    pretrain_steps: int = 200  # brief on purpose: valid rate 0.49 at seed 0 (the loss leaves its plateau here)
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    steps: int = 150  # RL optimiser steps
    prompts_per_step: int = 8
    group_size: int = 4  # G completions per prompt (GRPO, RLOO; PPO samples as many)
    lr: float = 1e-3  # Adam
    grad_clip: float = 1.0
    reward: str = "token_fraction"  # or "valid"
    epsilon: float = 0.2  # clip range of every ratio
    grpo_beta: float = 0.04
    loss_type: str = "dapo"  # GRPO's normalisation: grpo, bnpo, dr_grpo, dapo
    scale_rewards: str = "group"  # GRPO: group, batch, none
    rloo_beta: float = 0.05
    dpo_beta: float = 0.5  # 0.1 (TRL's default) overshot here: valid rate 0.49 -> 0.30 (docs/rlhf.md)
    dpo_prompts: int = 256  # prompts whose samples make the DPO pairs
    dpo_candidates: int = 8  # samples per prompt to find a valid and an invalid one
    dpo_batch: int = 16  # pairs per step
    ppo_kl_coef: float = 0.01
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 1.0
    eval_samples: int = 512
    bootstrap: int = 1000
    threads: int = 1  # torch intra-op threads (0: leave torch's setting)


class RLRules(Task):
    name = "rl-rules"
    version = "1.0"
    description = ("RL fine-tuning (GRPO, RLOO, DPO, PPO) of a briefly pretrained char GPT with the rule "
                   "validator as the reward: valid rate before and after, reward curve, KL to the reference")
    config_class = RLRulesConfig
    needs = frozenset({Capability.RL_LOSS})
    metrics = {
        "valid_rate_before": MetricSpec(higher_is_better=True, pair_atol=1e-6, gate_atol=0.05),
        "valid_rate_after": MetricSpec(higher_is_better=True, pair_atol=0.02, gate_atol=0.08),
        "reward_mean": MetricSpec(higher_is_better=True, pair_atol=0.02, gate_atol=0.05),
        "kl_to_ref": MetricSpec(higher_is_better=None, pair_atol=0.05, gate_atol=math.inf),
    }

    def validate(self) -> None:
        c = self.config
        if c.reward not in REWARDS:
            raise HarnessError(f"rl-rules.reward={c.reward!r}: choose one of {', '.join(REWARDS)}")
        if not c.n - 1 <= c.prompt_len < c.seq_len:
            raise HarnessError(f"rl-rules needs n-1 <= prompt_len < seq_len (got n={c.n}, prompt_len={c.prompt_len}, "
                               f"seq_len={c.seq_len})")
        if c.group_size < 2 or min(c.steps, c.prompts_per_step, c.eval_samples, c.dpo_batch) < 1:
            raise HarnessError("rl-rules needs group_size >= 2 and steps, prompts_per_step, eval_samples, "
                               "dpo_batch >= 1")
        if c.loss_type not in rl.LOSS_TYPES or c.scale_rewards not in rl.SCALE_REWARDS:
            raise HarnessError(f"rl-rules: loss_type must be one of {rl.LOSS_TYPES} and scale_rewards one of "
                               f"{rl.SCALE_REWARDS}")

    def refusal(self, model: ModelAdapter, capability: Capability) -> str:
        return (f"rl-rules fine-tunes its own policy; '{model.name}' is not one of: grpo-scratch, grpo-trl, "
                "rloo-scratch, rloo-trl, dpo-scratch, dpo-trl, ppo-scratch")

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        adapter = model.require(RLLoss, task=self.name)
        with torch_threads(self.config.threads):
            yield from self.run_algorithm(adapter, ctx.seed)

    # ---- the steps ---------------------------------------------------------------------------------
    def language(self, seed: int) -> RuleLanguage:
        c = self.config
        try:
            return RuleLanguage(RuleSpec(c.n, c.vocab, c.allowed, c.seq_len, seed=derive_seed(seed, "rl-rules", c.n)))
        except ValueError as e:
            raise HarnessError(f"{self.name}: {e}") from e

    def run_algorithm(self, model: RLLoss, seed: int) -> Iterator[Metric]:
        c, lang = self.config, self.language(seed)
        policy = model.new_policy(c.vocab, c.seq_len, derive_seed(seed, "rl-init"))
        recipe = Recipe(c.pretrain_steps, c.pretrain_batch, c.seq_len, c.pretrain_lr, derive_seed(seed, "rl-pre"))
        model.pretrain(policy, lang.sample(c.pretrain_samples, derive_seed(seed, "rl-pre-data")), recipe)
        eval_prompts = lang.sample(c.eval_samples, derive_seed(seed, "rl-eval-prompts"))[:, : c.prompt_len]
        before = self.sample(policy, eval_prompts, derive_seed(seed, "rl-eval"))
        session = model.rl_session(policy, self.algorithm_config(model.algorithm), c.group_size)
        start = time.perf_counter()
        curve = self.train(model.algorithm, session, lang, seed)
        seconds = time.perf_counter() - start
        after = self.sample(session.policy, eval_prompts, derive_seed(seed, "rl-eval"))
        yield from self.score(lang, before, after, session, curve, seconds, seed)

    def algorithm_config(self, algorithm: str):
        c = self.config
        completion = c.seq_len - c.prompt_len
        return {
            "grpo": rl.GRPOConfig(beta=c.grpo_beta, epsilon=c.epsilon, loss_type=c.loss_type,
                                  scale_rewards=c.scale_rewards, max_completion_length=completion),
            "rloo": rl.RLOOConfig(beta=c.rloo_beta, epsilon=c.epsilon),
            "dpo": rl.DPOConfig(beta=c.dpo_beta),
            "ppo": rl.PPOConfig(kl_coef=c.ppo_kl_coef, gamma=c.gamma, lam=c.lam, epsilon=c.epsilon,
                                vf_coef=c.vf_coef),
        }[algorithm]

    @torch.no_grad()
    def sample(self, policy: torch.nn.Module, prompts: torch.Tensor, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return policy.sample(len(prompts), self.config.seq_len, generator=gen, prefix=prompts)

    def rewards(self, lang: RuleLanguage, seqs: torch.Tensor) -> torch.Tensor:
        ok = lang.token_valid(seqs)
        if self.config.reward == "valid":
            return ok.all(dim=1).float()
        return ok[:, max(self.config.prompt_len, self.config.n - 1):].float().mean(dim=1)

    def train(self, algorithm: str, session: RLSession, lang: RuleLanguage, seed: int) -> list[float]:
        """RL steps with Adam; the mean reward of the samples drawn at every step."""
        c = self.config
        opt = torch.optim.Adam(session.parameters(), lr=c.lr)
        prompt_gen = torch.Generator().manual_seed(derive_seed(seed, "rl-prompts"))
        sample_gen = torch.Generator().manual_seed(derive_seed(seed, "rl-samples"))
        pairs = self.preference_pairs(session, lang, seed) if algorithm == "dpo" else None
        curve = []
        for step in range(c.steps):
            prompts = lang.sample(c.prompts_per_step, prompt_gen)[:, : c.prompt_len].repeat_interleave(c.group_size, 0)
            with torch.no_grad():
                seqs = session.policy.sample(len(prompts), c.seq_len, generator=sample_gen, prefix=prompts)
            rewards = self.rewards(lang, seqs)
            curve.append(round(float(rewards.mean()), 5))
            batch = rl.Rollout(prompts, seqs[:, c.prompt_len:], rewards) if pairs is None else \
                self.pair_batch(pairs, c.dpo_batch, derive_seed(seed, "rl-dpo-batch", step))
            prepared = session.prepare(batch)
            opt.zero_grad(set_to_none=True)
            session.loss(prepared).backward()
            torch.nn.utils.clip_grad_norm_(session.parameters(), c.grad_clip)
            opt.step()
        return curve

    # ---- DPO's data -------------------------------------------------------------------------------------
    def preference_pairs(self, session: RLSession, lang: RuleLanguage, seed: int) -> rl.Preferences:
        """For each of `dpo_prompts` prompts, the first valid and the first invalid of `dpo_candidates`
        samples of the pretrained policy (prompts with only one kind are skipped)."""
        c = self.config
        prompts = lang.sample(c.dpo_prompts, derive_seed(seed, "rl-dpo-prompts"))[:, : c.prompt_len]
        many = prompts.repeat_interleave(c.dpo_candidates, 0)
        seqs = self.sample(session.policy, many, derive_seed(seed, "rl-dpo-samples"))
        valid = lang.token_valid(seqs).all(dim=1).view(c.dpo_prompts, c.dpo_candidates)
        seqs = seqs.view(c.dpo_prompts, c.dpo_candidates, -1)
        keep = valid.any(1) & (~valid).any(1)
        if not keep.any():
            raise HarnessError("rl-rules: no prompt has both a valid and an invalid sample; raise dpo_candidates")
        rows = keep.nonzero().flatten()
        chosen = seqs[rows, valid[rows].float().argmax(1)]
        rejected = seqs[rows, (~valid[rows]).float().argmax(1)]
        p = c.prompt_len
        return rl.Preferences(prompts[rows], chosen[:, p:], rejected[:, p:])

    @staticmethod
    def pair_batch(pairs: rl.Preferences, size: int, seed: int) -> rl.Preferences:
        idx = torch.randint(len(pairs.prompt_ids), (size,), generator=torch.Generator().manual_seed(seed))
        return rl.Preferences(pairs.prompt_ids[idx], pairs.chosen_ids[idx], pairs.rejected_ids[idx])

    # ---- scoring ----------------------------------------------------------------------------------------
    def score(self, lang: RuleLanguage, before: torch.Tensor, after: torch.Tensor, session: RLSession,
              curve: list[float], seconds: float, seed: int) -> Iterator[Metric]:
        c = self.config
        info = {"rule_seed": lang.spec.seed, "train_seconds": round(seconds, 2)}
        for name, seqs in (("valid_rate_before", before), ("valid_rate_after", after)):
            valid = lang.token_valid(seqs).all(dim=1).double()
            low, high, se = bootstrap(valid, c.bootstrap, derive_seed(seed, "rl-bootstrap", name))
            yield self.metric(name, valid.mean(), n=len(valid), stderr=se, extra={**info, "ci_low": low,
                                                                                   "ci_high": high})
        rewards = self.rewards(lang, after).double()
        low, high, se = bootstrap(rewards, c.bootstrap, derive_seed(seed, "rl-bootstrap", "reward"))
        yield self.metric("reward_mean", rewards.mean(), n=len(rewards), stderr=se,
                          extra={**info, "ci_low": low, "ci_high": high, "reward_curve": curve,
                                 "reward": c.reward})
        kl = kl_to_reference(session, after, c.prompt_len)
        yield self.metric("kl_to_ref", kl, n=after.shape[0] * (c.seq_len - c.prompt_len), extra=info)

    @staticmethod
    def report_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
        return rl_rules_section(history, Path(fig_dir), Path(report_dir))


def bootstrap(values: torch.Tensor, resamples: int, seed: int) -> tuple[float, float, float]:
    """Percentile 95% interval and standard deviation of the mean over `resamples` resamples."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (resamples, len(values)), generator=gen)
    means = values[idx].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    return low, high, float(means.std())


@torch.no_grad()
def kl_to_reference(session: RLSession, seqs: torch.Tensor, prompt_len: int) -> float:
    """Mean over completion positions of sum_v pi(v) (log pi(v) - log pi_ref(v))."""
    logp = F.log_softmax(session.policy.logits(seqs)[:, prompt_len - 1 : -1].float(), dim=-1)
    ref = F.log_softmax(session.reference.logits(seqs)[:, prompt_len - 1 : -1].float(), dim=-1)
    return float((logp.exp() * (logp - ref)).sum(-1).mean())


# ---- parity of the losses (the `parity` task's branch for RL_LOSS pairs) -------------------------------------
PARITY_SHAPE = dict(vocab=4, prompt_len=3, completion=9, group_size=4, prompts=2)
PARITY_STEPS = 3  # SGD steps: the policy leaves the reference and the old policy, so clip and KL both act
PARITY_LR = 0.05


def parity_configs(algorithm: str, completion: int) -> dict[str, object]:
    """Every configuration a pair is compared on: GRPO under each of TRL's loss normalisations (the
    batch's completions have different lengths, so they give different losses) and reward scalings,
    with and without the ratio-weighted KL."""
    if algorithm == "grpo":
        configs = {f"loss_type={lt}": rl.GRPOConfig(loss_type=lt, max_completion_length=completion)
                   for lt in rl.LOSS_TYPES}
        configs |= {f"scale_rewards={s}": rl.GRPOConfig(scale_rewards=s, max_completion_length=completion)
                    for s in ("batch", "none")}
        configs["kl_ratio_correction=False"] = rl.GRPOConfig(kl_ratio_correction=False,
                                                             max_completion_length=completion)
        return configs
    if algorithm == "rloo":
        return {"default": rl.RLOOConfig(), "normalize_advantages": rl.RLOOConfig(normalize_advantages=True)}
    return {"default": rl.DPOConfig()}


def parity_batch(algorithm: str, seed: int) -> rl.Rollout | rl.Preferences:
    s, gen = PARITY_SHAPE, torch.Generator().manual_seed(seed)
    b = s["prompts"] * s["group_size"]
    prompts = torch.randint(s["vocab"], (b, s["prompt_len"]), generator=gen)
    if algorithm == "dpo":
        return rl.Preferences(prompts, *(torch.randint(s["vocab"], (b, s["completion"]), generator=gen)
                                         for _ in range(2)))
    completions = torch.randint(s["vocab"], (b, s["completion"]), generator=gen)
    rewards = torch.randint(0, 3, (b,), generator=gen).float()
    lengths = torch.randint(s["completion"] // 2, s["completion"] + 1, (b,), generator=gen)  # ragged, right-padded
    mask = (torch.arange(s["completion"])[None, :] < lengths[:, None]).long()
    return rl.Rollout(prompts, completions, rewards, mask)


def trace(session: RLSession, batch) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Losses and gradients (reference layout) over PARITY_STEPS SGD steps on one prepared batch."""
    opt = torch.optim.SGD(session.parameters(), lr=PARITY_LR)
    prepared, losses, grads = session.prepare(batch), [], []
    for _ in range(PARITY_STEPS):
        opt.zero_grad(set_to_none=True)
        loss = session.loss(prepared)
        loss.backward()
        losses.append(loss.item())
        grads.append(session.reference_grads())
        opt.step()
    return losses, grads


def rl_parity(model: RLLoss, reference: RLLoss, seed: int) -> tuple[float, float, dict]:
    """(max |loss diff|, max |grad diff|, per-configuration detail) of a scratch RL model and its TRL
    reference: the same policy (one seeded init, copied), the same batch, the same SGD steps."""
    if model.algorithm != reference.algorithm:
        raise HarnessError(f"parity: {model.name} ({model.algorithm}) and {reference.name} "
                           f"({reference.algorithm}) are different algorithms")
    s = PARITY_SHAPE
    policy = model.new_policy(s["vocab"], s["prompt_len"] + s["completion"], derive_seed(seed, "rl-parity"))
    batch = parity_batch(model.algorithm, derive_seed(seed, "rl-parity-batch"))
    detail = {}
    for label, cfg in parity_configs(model.algorithm, s["completion"]).items():
        (ours, our_grads), (theirs, their_grads) = (trace(m.rl_session(policy, cfg, s["group_size"]), batch)
                                                    for m in (model, reference))
        missing = sorted(set(their_grads[0]) - set(our_grads[0]))
        if missing:
            raise HarnessError(f"parity: {model.name} has no gradient for reference parameters {missing[:6]}")
        detail[label] = {
            "loss_diff": max(abs(a - b) for a, b in zip(ours, theirs)),
            "grad_diff": max((g[k] - h[k]).abs().max().item() for g, h in zip(our_grads, their_grads) for k in h),
            "losses": [round(x, 6) for x in theirs],
            "max_abs_grad": max(h[k].abs().max().item() for h in their_grads for k in h),
        }
    return (max(d["loss_diff"] for d in detail.values()), max(d["grad_diff"] for d in detail.values()),
            {"configs": detail, "steps": PARITY_STEPS, "lr": PARITY_LR, **s})


# ---- report -----------------------------------------------------------------------------------------------
def rl_rules_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
    """Markdown: one row per model (valid rate before -> after with intervals, reward, KL), then the
    reward curves of each algorithm, scratch and TRL side by side."""
    from harness.api import latest

    rows = latest(history)
    if rows.empty:
        return ""
    lines = ["### RL on the rule language: valid rate before and after fine-tuning", "",
             "| model | valid rate before | valid rate after | reward (eval) | KL to ref (nats/token) |",
             "|---|---|---|---|---|"]
    for model, block in rows.groupby("model", sort=True):
        cells = [_ci(block, m) for m in ("valid_rate_before", "valid_rate_after", "reward_mean")]
        kl = block[block["metric"] == "kl_to_ref"]["value"]
        cells.append(f"{kl.iloc[-1]:.4f}" if len(kl) else "-")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    picture = plot_curves(rows, fig_dir / "rl_rules_rewards.png")
    if picture is not None:
        rel = picture.relative_to(report_dir) if picture.is_relative_to(report_dir) else picture
        lines += ["", f"![rl-rules reward curves]({rel.as_posix()})", "",
                  "Mean reward of the samples drawn at each step (for GRPO, RLOO and PPO the training "
                  "rollouts; for DPO, which trains on fixed pairs, a fresh batch), scratch and TRL side by "
                  "side, one panel per algorithm; the curves are smoothed over 10 steps."]
    return "\n".join(lines) + "\n"


def _ci(block: pd.DataFrame, metric: str) -> str:
    row = block[block["metric"] == metric]
    if row.empty:
        return "-"
    r = row.iloc[-1]
    extra = r["extra"] if isinstance(r["extra"], dict) else {}
    if extra.get("ci_low") is None:
        return f"{r['value']:.3f}"
    return f"{r['value']:.3f} [{extra['ci_low']:.3f}, {extra['ci_high']:.3f}]"


def plot_curves(rows: pd.DataFrame, path: Path) -> Path | None:
    block = rows[rows["metric"] == "reward_mean"]
    curves = {r["model"]: r["extra"].get("reward_curve") for _, r in block.iterrows() if isinstance(r["extra"], dict)}
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algorithms = sorted({m.rsplit("-", 1)[0] for m in curves})
    fig, axes = plt.subplots(1, len(algorithms), figsize=(3.6 * len(algorithms), 3.2), squeeze=False, sharey=True)
    for ax, algorithm in zip(axes[0], algorithms):
        for model in sorted(m for m in curves if m.rsplit("-", 1)[0] == algorithm):
            series = pd.Series(curves[model]).rolling(10, min_periods=1).mean()
            trl = model.endswith("-trl")  # dashed on top: where the two coincide both stay visible
            ax.plot(series.index, series.values, label=model, lw=1.0 if trl else 2.0, ls="--" if trl else "-")
        ax.set(title=algorithm.upper(), xlabel="step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean reward")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TASKS.add(RLRules.name, RLRules.description, RLRules)
