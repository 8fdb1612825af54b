"""reproductions/rl.py on cases worked by hand, and GAE against stable-baselines3 where it installs."""

import inspect
import math

import pytest
import torch

from reproductions import rl
from tests.reproductions.test_contract import _allowed, _imports


def test_imports_only_torch_the_standard_library_and_common():
    """rl.py is losses, not a model with a transformers twin, so test_contract's REPROS do not list it;
    it keeps the same import rule."""
    imports = _imports(inspect.getsource(rl))
    assert imports and [m for m, names in imports if not _allowed(m, names)] == []


# ---- GAE ----------------------------------------------------------------------------------------------
# rewards (0, 0, 1), values (0.5, 0.6, 0.7), gamma 0.9, lambda 0.8, the episode ends after step 3:
#   delta_2 = 1 + 0.9 * 0   - 0.7 = 0.3          A_2 = 0.3
#   delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03         A_1 = 0.03 + 0.72 * 0.3   = 0.246
#   delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04         A_0 = 0.04 + 0.72 * 0.246 = 0.21712
#   returns = A + V = (0.71712, 0.846, 1.0)
REWARDS, VALUES, GAMMA, LAM = [0.0, 0.0, 1.0], [0.5, 0.6, 0.7], 0.9, 0.8


def test_gae_on_a_three_step_episode_worked_by_hand():
    adv, ret = rl.gae(torch.tensor([REWARDS]), torch.tensor([VALUES]), torch.ones(1, 3), GAMMA, LAM)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0]]))


def test_gae_ends_the_episode_at_the_last_real_token():
    # mask (1, 1, 0): two steps; delta_1 = 0 - 0.6, A_1 = -0.6; delta_0 = 0.9 * 0.6 - 0.5 = 0.04,
    # A_0 = 0.04 + 0.72 * (-0.6) = -0.392; nothing after the mask
    adv, _ = rl.gae(torch.tensor([REWARDS]), torch.tensor([VALUES]), torch.tensor([[1.0, 1.0, 0.0]]), GAMMA, LAM)
    torch.testing.assert_close(adv, torch.tensor([[-0.392, -0.6, 0.0]]))


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    adv, ret = rl.gae(torch.tensor([REWARDS]), torch.tensor([VALUES]), torch.ones(1, 3), GAMMA, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[0.81, 0.9, 1.0]]))  # gamma^2, gamma, 1
    torch.testing.assert_close(adv, ret - torch.tensor([VALUES]))


def test_gae_matches_stable_baselines3():
    sb3 = pytest.importorskip("stable_baselines3.common.buffers")
    spaces = pytest.importorskip("gymnasium.spaces")
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.rand(6, generator=gen), torch.rand(6, generator=gen)
    buf = sb3.RolloutBuffer(6, spaces.Box(-1, 1, (1,)), spaces.Discrete(2), device="cpu", gae_lambda=0.9, gamma=0.95)
    for t in range(6):
        buf.add(torch.zeros(1, 1).numpy(), torch.zeros(1, 1).numpy(), rewards[t : t + 1].numpy(),
                torch.tensor([float(t == 0)]).numpy(), values[t : t + 1], torch.zeros(1))
    buf.compute_returns_and_advantage(last_values=torch.zeros(1), dones=torch.ones(1).numpy())
    adv, ret = rl.gae(rewards[None], values[None], torch.ones(1, 6), 0.95, 0.9)
    torch.testing.assert_close(adv[0], torch.from_numpy(buf.advantages[:, 0]).float())
    torch.testing.assert_close(ret[0], torch.from_numpy(buf.returns[:, 0]).float())


# ---- the clipped ratio ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio, adv, loss, grad", [
    (1.5, 2.0, -2.4, 0.0),  # r > 1 + eps with A > 0: clipped at 1.2 * 2, no gradient
    (1.5, -2.0, 3.0, 3.0),  # A < 0: min picks the unclipped r A = -3; d(-r A)/d logp = -A r = 3
    (0.5, 1.0, -0.5, -0.5),  # r < 1 - eps with A > 0: unclipped r A is the smaller; gradient -A r
    (0.5, -1.0, 0.8, 0.0),  # A < 0: clipped at 0.8 * -1 is the smaller: no gradient
], ids=["high-pos", "high-neg", "low-pos", "low-neg"])
def test_clipped_surrogate_by_hand(ratio, adv, loss, grad):
    logp = torch.tensor(math.log(ratio), requires_grad=True)
    out = rl.clipped_surrogate(logp, torch.tensor(0.0), torch.tensor(adv), 0.2)
    out.backward()
    assert out.item() == pytest.approx(loss, abs=1e-6) and logp.grad.item() == pytest.approx(grad, abs=1e-6)


def test_clip_higher_uses_its_own_upper_bound():
    out = rl.clipped_surrogate(torch.tensor(math.log(1.5)), torch.tensor(0.0), torch.tensor(1.0), 0.2, 0.28)
    assert out.item() == pytest.approx(-1.28)


# ---- k3 --------------------------------------------------------------------------------------------------
def test_k3_by_hand_and_zero_at_the_reference():
    # pi = 0.5, pi_ref = 0.25: x = pi_ref / pi = 0.5; k3 = x - 1 - log x = 0.5 - 1 + log 2
    assert rl.kl_k3(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))).item() == pytest.approx(
        math.log(2) - 0.5)
    assert rl.kl_k3(torch.tensor(-1.3), torch.tensor(-1.3)).item() == 0.0


def test_k3_is_nonnegative_and_unbiased_for_kl():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    k3 = rl.kl_k3(p.log(), q.log())
    assert (k3 >= 0).all()
    assert float((p * k3).sum()) == pytest.approx(float((p * (p / q).log()).sum()), abs=1e-6)  # E_p[k3] = KL(p||q)


# ---- GRPO -------------------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    # group (1, 0, 0, 1): mean 0.5, Bessel std sqrt(1/3); TRL divides by std + 1e-4
    adv = rl.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(rl.group_advantages(torch.tensor([1.0, 0.0, 3.0, 0.0]), 2, "none"),
                               torch.tensor([0.5, -0.5, 1.5, -1.5]))


def test_loss_normalisations_by_hand():
    per_token, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert rl.aggregate(per_token, mask, "grpo").item() == pytest.approx((2.0 + 4.0) / 2)  # mean of row means
    assert rl.aggregate(per_token, mask, "bnpo").item() == pytest.approx(10.0 / 4)  # token mean
    assert rl.aggregate(per_token, mask, "dapo").item() == pytest.approx(10.0 / 4)
    assert rl.aggregate(per_token, mask, "dr_grpo", 5).item() == pytest.approx(10.0 / (2 * 5))
    with pytest.raises(ValueError, match="loss_type"):
        rl.aggregate(per_token, mask, "mean")


def test_grpo_loss_on_policy_is_minus_the_mean_advantage_plus_beta_kl():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    cfg = rl.GRPOConfig(beta=0.5, loss_type="grpo")
    kl = rl.kl_k3(logp, ref).mean()
    assert rl.grpo_loss(logp, logp, ref, torch.tensor([2.0]), torch.ones(1, 2), cfg).item() == pytest.approx(
        -2.0 + 0.5 * kl.item())


# ---- RLOO -------------------------------------------------------------------------------------------------
def test_leave_one_out_baseline_by_hand():
    # (1, 0, 0, 1): baselines (1/3, 2/3, 2/3, 1/3) -> advantages (2/3, -2/3, -2/3, 2/3)
    torch.testing.assert_close(rl.leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4),
                               torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    # (3, 1): each one's baseline is the other's reward
    torch.testing.assert_close(rl.leave_one_out_advantages(torch.tensor([3.0, 1.0]), 2), torch.tensor([2.0, -2.0]))


def test_rloo_puts_the_summed_k1_kl_into_the_reward():
    old, ref, mask = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]]), torch.tensor([[-2.0, -1.0], [-1.0, -1.0]]), \
        torch.ones(2, 2)
    adv = rl.rloo_advantages(torch.tensor([1.0, 1.0]), old, ref, mask, 2, rl.RLOOConfig(beta=0.5))
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5]))  # rewards 1 - 0.5 * 1 and 1 - 0


# ---- DPO --------------------------------------------------------------------------------------------------
def test_dpo_sigmoid_loss_by_hand():
    # margin = (-1 - -1.5) - (-2 - -1.5) = 1; loss = -log sigmoid(0.1) = log(1 + e^-0.1)
    one = rl.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 0.1)
    assert one.item() == pytest.approx(math.log1p(math.exp(-0.1)))
    zero = rl.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-2.0]), 0.1)
    assert zero.item() == pytest.approx(math.log(2))  # policy = reference: no preference yet


# ---- PPO --------------------------------------------------------------------------------------------------
def test_kl_penalty_on_every_token_and_the_score_on_the_last():
    rewards = rl.kl_penalized_rewards(torch.tensor([1.0]), torch.tensor([[-1.0, -1.0]]), torch.tensor([[-1.5, -0.5]]),
                                      torch.ones(1, 2), 0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 1.05]]))


def test_clipped_value_loss_by_hand():
    # V = 1.0, V_old = 0.5, R = 2: the clipped value is 0.7; 0.5 max((1 - 2)^2, (0.7 - 2)^2) = 0.845
    out = rl.clipped_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1))
    assert out.item() == pytest.approx(0.845)


def test_completion_logprobs_align_position_t_minus_1_with_token_t():
    logits = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 2, 1, 2]])
    lp = rl.completion_logprobs(logits, ids, prompt_len=2)
    expected = torch.stack([logits[0, 1].log_softmax(-1)[1], logits[0, 2].log_softmax(-1)[2]])
    torch.testing.assert_close(lp[0], expected)
