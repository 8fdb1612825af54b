"""RL fine-tuning pairs: our losses (reproductions/rl.py) against TRL's trainers, on a char GPT.

    grpo-scratch / grpo-trl   GRPO (Shao et al. 2024)   vs trl.GRPOTrainer
    rloo-scratch / rloo-trl   RLOO (Ahmadian et al. 2024) vs trl.RLOOTrainer
    dpo-scratch  / dpo-trl    DPO (Rafailov et al. 2023)  vs trl.DPOTrainer
    ppo-scratch               PPO (Schulman et al. 2017) with a value head and GAE; TRL 1.16 has no PPO
                              trainer, so it is held to hand-computed cases and stable-baselines3's GAE
                              (tests/reproductions/test_rl.py, docs/rlhf.md)

The policy is the character-level GPT of the ladder (reproductions/gpt2.py at the `tiny` size, as
`char-gpt-scratch`). A task asks for a fresh one (`new_policy`), pretrains it (`pretrain`) and starts
an RL run on a copy of it (`rl_session`): the copy is trained, the original is the frozen reference.

The `-trl` side never re-implements anything: it writes the policy to a temporary directory as a
transformers.GPT2LMHeadModel, builds the TRL trainer on it (which loads the policy and, from the same
path, its reference), and for every batch calls TRL's own code: `_generate_and_score_completions`
(with generation replaced by the task's samples and the reward function returning the task's
rewards: the old and reference log-probabilities, the KL in RLOO's reward and the advantages are
TRL's) and then the trainer's `compute_loss`. Only the optimiser step is ours, the same for both sides.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.api import MODELS, Capability, HarnessError, ModelAdapter, ModelInfo, ModelSpec, Recipe, Weights
from harness.models.charlm import ScratchCharGPT, trained_arch
from reproductions import charlm, gpt2, rl

ALGORITHMS = ("grpo", "rloo", "dpo", "ppo")
CONFIGS = {"grpo": rl.GRPOConfig, "rloo": rl.RLOOConfig, "dpo": rl.DPOConfig, "ppo": rl.PPOConfig}
SIZES = {"tiny": {}, "small": dict(n_layer=4, n_head=4, n_embd=128)}  # over gpt2.name_to_config["tiny"]


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _frozen(module: nn.Module) -> nn.Module:
    module = copy.deepcopy(module).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ---- our side ------------------------------------------------------------------------------------
class ScratchSession:
    """RL on a copy of a ScratchCharGPT with the losses of reproductions/rl.py."""

    def __init__(self, policy: ScratchCharGPT, cfg: Any, group_size: int) -> None:
        self.policy, self.reference = copy.deepcopy(policy).train(), _frozen(policy)
        self.cfg, self.group_size = cfg, group_size

    def parameters(self) -> list[nn.Parameter]:
        return list(self.policy.parameters())

    def reference_grads(self) -> dict[str, torch.Tensor]:
        return self.policy.gpt.to_hf_state_dict(_grads(self.policy.gpt))

    @staticmethod
    def logp(model: charlm.CharLM, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
        return rl.completion_logprobs(model.logits(ids), ids, prompt_len)  # (B, C)

    def prepare(self, batch: rl.Rollout) -> dict[str, torch.Tensor]:
        ids, p = batch.ids, batch.prompt_ids.shape[1]
        mask = batch.mask
        with torch.no_grad():
            old, ref = self.logp(self.policy, ids, p), self.logp(self.reference, ids, p)
        if isinstance(self.cfg, rl.GRPOConfig):
            adv = rl.group_advantages(batch.rewards, self.group_size, self.cfg.scale_rewards)
        else:
            adv = rl.rloo_advantages(batch.rewards, old, ref, mask, self.group_size, self.cfg)
        return {"ids": ids, "prompt_len": p, "mask": mask, "old": old, "ref": ref, "adv": adv}

    def loss(self, prep: dict) -> torch.Tensor:
        logp = self.logp(self.policy, prep["ids"], prep["prompt_len"])
        if isinstance(self.cfg, rl.GRPOConfig):
            return rl.grpo_loss(logp, prep["old"], prep["ref"], prep["adv"], prep["mask"], self.cfg)
        old_seq = (prep["old"] * prep["mask"]).sum(-1)
        return rl.rloo_loss(logp, old_seq, prep["adv"], prep["mask"], self.cfg)


class ScratchDPOSession(ScratchSession):
    def prepare(self, batch: rl.Preferences) -> dict[str, torch.Tensor]:
        p = batch.prompt_ids.shape[1]
        ids = torch.cat([torch.cat([batch.prompt_ids, c], 1) for c in (batch.chosen_ids, batch.rejected_ids)])
        with torch.no_grad():
            ref = self.logp(self.reference, ids, p).sum(-1)
        return {"ids": ids, "prompt_len": p, "ref": ref}

    def loss(self, prep: dict) -> torch.Tensor:
        chosen, rejected = self.logp(self.policy, prep["ids"], prep["prompt_len"]).sum(-1).chunk(2)
        ref_chosen, ref_rejected = prep["ref"].chunk(2)
        return rl.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.cfg.beta)


class ScratchPPOSession(ScratchSession):
    """PPO: a value head on the policy's last hidden state, the KL penalty in the per-token reward,
    GAE advantages (whitened), the clipped surrogate and the clipped value loss."""

    def __init__(self, policy: ScratchCharGPT, cfg: rl.PPOConfig, group_size: int) -> None:
        super().__init__(policy, cfg, group_size)
        self.value_head = rl.ValueHead(policy.gpt.config.n_embd)

    def parameters(self) -> list[nn.Parameter]:
        return [*self.policy.parameters(), *self.value_head.parameters()]

    def forward(self, ids: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.policy.gpt.hidden_states(ids)  # (B, P+C, n_embd)
        logp = rl.completion_logprobs(self.policy.gpt.lm_head(hidden), ids, p)
        return logp, self.value_head(hidden[:, p - 1 : -1])  # V of the state before each completion token

    def prepare(self, batch: rl.Rollout) -> dict[str, torch.Tensor]:
        ids, p, c = batch.ids, batch.prompt_ids.shape[1], self.cfg
        mask = batch.mask
        with torch.no_grad():
            old, values = self.forward(ids, p)
            ref = self.logp(self.reference, ids, p)
        rewards = rl.kl_penalized_rewards(batch.rewards, old, ref, mask, c.kl_coef)
        adv, returns = rl.gae(rewards, values, mask, c.gamma, c.lam)
        return {"ids": ids, "prompt_len": p, "mask": mask, "old": old, "values": values,
                "adv": rl.whiten(adv, mask), "returns": returns}

    def loss(self, prep: dict) -> torch.Tensor:
        logp, values = self.forward(prep["ids"], prep["prompt_len"])
        return rl.ppo_loss(logp, prep["old"], values, prep["values"], prep["adv"], prep["returns"], prep["mask"],
                           self.cfg)


# ---- TRL's side ----------------------------------------------------------------------------------
class HFPolicy(charlm.CharLM):
    """A transformers causal LM (a TRL trainer's model or reference) behind the CharLM interface."""

    def __init__(self, hf: nn.Module, vocab: int) -> None:
        super().__init__()
        self.hf, self.vocab = hf, vocab

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx).logits


def symbol_tokenizer(vocab: int):
    """A transformers tokenizer over the task's symbols, one character each ('a', 'b', ...): what TRL
    needs for padding ids and for logging completions; every sequence here has the same length."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = [chr(ord("a") + i) for i in range(vocab)]
    backend = Tokenizer(models.WordLevel(vocab={s: i for i, s in enumerate(symbols)}, unk_token=symbols[0]))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=symbols[0], eos_token=symbols[0],
                                   unk_token=symbols[0])


def _text(ids: torch.Tensor) -> list[str]:
    return ["".join(chr(ord("a") + int(i)) for i in row) for row in ids]


def save_as_transformers(policy: ScratchCharGPT, where: Path, vocab: int) -> None:
    """The scratch policy's weights as a transformers.GPT2LMHeadModel directory (exact copy)."""
    import transformers

    hf_class = getattr(transformers, gpt2.HF_CLASS)
    kwargs = {**policy.gpt.config.to_hf_kwargs(), "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    hf = hf_class(hf_class.config_class(**kwargs))
    hf.load_state_dict(policy.gpt.to_hf_state_dict(), strict=True)
    hf.save_pretrained(where)
    symbol_tokenizer(vocab).save_pretrained(where)


def _common_args(out: str, batch: int) -> dict[str, Any]:
    return dict(output_dir=out, use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no", logging_steps=1,
                per_device_train_batch_size=batch, seed=0)


class TRLSession:
    """One TRL trainer (GRPO, RLOO or DPO) built on a copy of the policy; TRL computes every loss."""

    def __init__(self, algorithm: str, policy: ScratchCharGPT, cfg: Any, group_size: int) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"rl-{algorithm}-trl-")
        where = Path(self._tmp.name) / "policy"
        save_as_transformers(policy, where, policy.vocab)
        self.algorithm, self.cfg, self.group_size, self.vocab = algorithm, cfg, group_size, policy.vocab
        self._rewards: list[float] = []
        self.trainer = self._build(where, str(Path(self._tmp.name) / "out"))
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop; one step here
        self.policy = HFPolicy(self.trainer.model, policy.vocab).train()
        self.reference = HFPolicy(self.trainer.ref_model, policy.vocab).eval()

    def _reward(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        """TRL's reward function: the task's rewards of the batch being scored."""
        return self._rewards

    def _build(self, where: Path, out: str):
        import trl
        from datasets import Dataset

        c, g, tok = self.cfg, self.group_size, symbol_tokenizer(self.vocab)
        if self.algorithm == "dpo":
            args = trl.DPOConfig(beta=c.beta, loss_type=["sigmoid"], **_common_args(out, 2))
            data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # required, never used
            return trl.DPOTrainer(model=str(where), args=args, train_dataset=data, processing_class=tok)
        data = Dataset.from_list([{"prompt": "a"}] * g)  # required by the trainer, never read: see prepare
        shared = dict(beta=c.beta, epsilon=c.epsilon, epsilon_high=c.epsilon_high, num_generations=g,
                      temperature=1.0, **_common_args(out, g))
        if self.algorithm == "grpo":
            if c.max_completion_length is None:
                raise HarnessError("grpo-trl needs GRPOConfig.max_completion_length (TRL's dr_grpo constant)")
            args = trl.GRPOConfig(loss_type=c.loss_type, scale_rewards=c.scale_rewards, num_iterations=2,
                                  use_bias_correction_kl=c.kl_ratio_correction,
                                  max_completion_length=c.max_completion_length, **shared)
            # num_iterations=2 makes TRL compute and keep the old log-probabilities at scoring time
            return trl.GRPOTrainer(model=str(where), reward_funcs=self._reward, args=args, train_dataset=data,
                                   processing_class=tok)
        args = trl.RLOOConfig(normalize_advantages=c.normalize_advantages, **shared)
        return trl.RLOOTrainer(model=str(where), reward_funcs=self._reward, args=args, train_dataset=data,
                               processing_class=tok)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.trainer.model.parameters())

    def reference_grads(self) -> dict[str, torch.Tensor]:
        return _grads(self.trainer.model)

    def prepare(self, batch: rl.Rollout | rl.Preferences) -> dict[str, Any]:
        self.trainer.model.train()
        if isinstance(batch, rl.Preferences):
            return self._preferences(batch)
        lengths = batch.mask.sum(-1).long().tolist()  # right padding: TRL pads the lists back, masked
        prompt_ids = batch.prompt_ids.tolist()
        completion_ids = [row[:n] for row, n in zip(batch.completion_ids.tolist(), lengths)]
        completions = ["".join(chr(ord("a") + i) for i in row) for row in completion_ids]
        if self.algorithm == "grpo":  # TRL's _generate, answered with the task's samples
            self.trainer._generate = lambda prompts: (prompt_ids, completion_ids, None, completions, None, {},
                                                      None, None)
        else:
            self.trainer._generate = lambda prompts: (prompt_ids, completion_ids, completions)
        self._rewards = batch.rewards.tolist()
        inputs = [{"prompt": text} for text in _text(batch.prompt_ids)]
        return self.trainer._generate_and_score_completions(inputs)

    @staticmethod
    def _preferences(batch: rl.Preferences) -> dict[str, torch.Tensor]:
        """DPOTrainer's collated batch: [chosen; rejected] rows, completion_mask 0 on the prompt."""
        ids = torch.cat([torch.cat([batch.prompt_ids, c], 1) for c in (batch.chosen_ids, batch.rejected_ids)])
        completion_mask = torch.ones_like(ids)
        completion_mask[:, : batch.prompt_ids.shape[1]] = 0
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion_mask}

    def loss(self, prepared: dict[str, Any]) -> torch.Tensor:
        return self.trainer.compute_loss(self.trainer.model, prepared)


# ---- the adapters ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    algorithm: str
    paper: str
    reference_class: str | None  # the TRL trainer, None for PPO


PAIRS = (
    Pair("grpo", "GRPO (Shao et al. 2024, DeepSeekMath)", "GRPOTrainer"),
    Pair("rloo", "RLOO (Ahmadian et al. 2024)", "RLOOTrainer"),
    Pair("dpo", "DPO (Rafailov et al. 2023)", "DPOTrainer"),
    Pair("ppo", "PPO with value head and GAE (Schulman et al. 2017)", None),
)


class RLModel(ModelAdapter):
    """An RL algorithm on the char GPT: ours (`impl="scratch"`) or TRL's (`impl="hf"`)."""

    capabilities = frozenset({Capability.RL_LOSS})

    def __init__(self, info: ModelInfo, algorithm: str, weights: Weights, device: str) -> None:
        super().__init__(info, nn.Module(), weights.tokenizer, weights, device)
        self.algorithm = algorithm
        self.size = weights.hf_config
        if self.device.type != "cpu":
            raise HarnessError(f"{info.name} runs on the CPU only (use --device cpu)")

    @property
    def max_length(self) -> int:
        return 1024

    def new_policy(self, vocab_size: int, seq_len: int, seed: int) -> ScratchCharGPT:
        cfg = gpt2.GPT2Config.from_name("tiny", vocab_size=vocab_size, block_size=seq_len, **self.size.kwargs)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return ScratchCharGPT(cfg)

    def pretrain(self, lm: charlm.CharLM, data: torch.Tensor, recipe: Recipe) -> list[float]:
        return charlm.train_lm(lm, charlm.row_batches(data, recipe.batch_size), recipe.steps, lr=recipe.lr,
                               grad_clip=recipe.grad_clip, seed=recipe.seed, schedule=recipe.schedule)

    def rl_session(self, policy: ScratchCharGPT, config: Any, group_size: int):
        if not isinstance(config, CONFIGS[self.algorithm]):
            raise HarnessError(f"{self.name} takes a {CONFIGS[self.algorithm].__name__}, got {type(config).__name__}")
        if self.info.impl == "hf":
            return TRLSession(self.algorithm, policy, config, group_size)
        session = {"dpo": ScratchDPOSession, "ppo": ScratchPPOSession}.get(self.algorithm, ScratchSession)
        return session(policy, config, group_size)


ARCH = trained_arch("rl-char-gpt", SIZES)


def _register(pair: Pair) -> None:
    scratch = ModelInfo(f"{pair.algorithm}-scratch", pair.algorithm, "scratch",
                        f"{pair.algorithm}-trl" if pair.reference_class else None)
    MODELS.add(scratch.name, f"{pair.paper}, from scratch (reproductions/rl.py) on a char GPT; trained by rl-rules",
               ModelSpec(scratch, ARCH, lambda w, d: RLModel(scratch, pair.algorithm, w, d)))
    if pair.reference_class:
        ref = ModelInfo(f"{pair.algorithm}-trl", pair.algorithm, "hf", None)
        MODELS.add(ref.name, f"reference: trl.{pair.reference_class} (TRL 1.16) losses on the same char GPT",
                   ModelSpec(ref, ARCH, lambda w, d: RLModel(ref, pair.algorithm, w, d)))


for _pair in PAIRS:
    _register(_pair)
