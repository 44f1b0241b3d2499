"""Direct Preference Optimization (Rafailov et al. 2023, "Your Language Model is Secretly a Reward Model").

Given a prompt x, a preferred ("chosen") answer y_w and a dispreferred ("rejected") one y_l, DPO trains the policy
π_θ to raise y_w's log-probability relative to a frozen reference π_ref (the SFT model) more than y_l's:

    ρ_w = log π_θ(y_w|x) − log π_ref(y_w|x)          ρ_l = log π_θ(y_l|x) − log π_ref(y_l|x)     (log-ratios)
    h   = β·(ρ_w − ρ_l)                                                                          (the margin)
    loss = −log σ(h)                                                                             (Eq. 7)

Why this is RLHF without a reward model: the optimum of max E[r] − β·KL(π_θ || π_ref) is
π*(y|x) ∝ π_ref(y|x)·e^{r(x,y)/β}, so a policy defines the reward it is optimal for, r = β·ρ + β·log Z(x) (Eq. 5).
In the Bradley-Terry likelihood σ(r_w − r_l) of a human preference the intractable log Z(x) cancels, and maximising
it is minimising −log σ(h). β·ρ is the implicit reward TRL logs as `rewards/chosen|rejected`; their difference is
`rewards/margins`, and `rewards/accuracies` counts the pairs whose chosen reward is strictly higher. At step 1 the
policy equals the reference: every ρ is 0, the loss is log 2 ≈ 0.693 and the accuracy 0.

One forward pass scores both answers: the B chosen sequences and the B rejected ones are stacked into one batch of
2B rows, chosen first ([chosen; rejected], nanodpo/dpo_data.py `PreferenceCollator`), so `tensor.chunk(2)` splits any
per-row tensor back into (chosen, rejected). A worked example, B = 2, β = 0.1 (tests/test_dpo_loss.py checks it):

    summed log-probs   policy    [-12.0,  -8.0,  -15.0,  -9.0]   -> chosen [-12.0, -8.0], rejected [-15.0, -9.0]
                       reference [-13.0,  -8.5,  -14.0,  -9.5]   -> chosen [-13.0, -8.5], rejected [-14.0, -9.5]
    log-ratios ρ       chosen [1.0, 0.5]      rejected [-1.0, 0.5]
    rewards β·ρ        chosen [0.1, 0.05]     rejected [-0.1, 0.05]     margins h [0.2, 0.0]
    per-pair loss      -log σ([0.2, 0.0]) = [0.5981, 0.6931]            loss = mean = 0.6456
    rewards/accuracies mean([0.1 > -0.1, 0.05 > 0.05]) = 0.5

The step, in the order it runs: `concatenated_inputs` (what the model is called with), nanodpo/logps.py (per-token
log-probs), `sequence_logps` (a sequence's log-prob), the reference's log-probs (nanodpo/reference.py), `dpo_loss`.
Every other loss of the family — the 14 other pair losses of TRL 1.16, SimPO, CPO, ORPO, KTO, and the f-DPO, LD-DPO
and WPO modifiers — is in nanodpo/losses/, with its equation and source.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanodpo.logps import ModelInputs, TokenStats


@dataclass
class DPOOutput:
    """One micro-batch's loss and what its metrics need (nanodpo/losses/metrics.py). Every tensor but `loss` is
    detached; [B] = one value per pair."""

    loss: torch.Tensor  # scalar, with grad: the mean over the micro-batch's pairs (+ an NLL term for some losses)
    chosen_logps: torch.Tensor  # [B] log π_θ(y_w|x)
    rejected_logps: torch.Tensor  # [B] log π_θ(y_l|x)
    chosen_rewards: torch.Tensor  # [B] β·ρ_w
    rejected_rewards: torch.Tensor  # [B] β·ρ_l
    mask: torch.Tensor | None = None  # [2B, T-1] the shifted completion mask the metrics average over
    pair_losses: torch.Tensor | None = None  # [B] each pair's share of the loss (what evaluation averages)
    nll_loss: torch.Tensor | None = None  # NLL of the chosen tokens, for the losses with an NLL term
    nll_mask: torch.Tensor | None = None  # [B, T-1] the tokens that NLL averages over
    log_odds: torch.Tensor | None = None  # [B] ORPO's log odds ratio


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of each pair, as the paper writes it (Eq. 7). Inputs: summed log-probs, shape [B].

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); the rewards β·ρ are detached.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # ρ_w
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # ρ_l
    margins = beta * (chosen_logratios - rejected_logratios)  # h
    losses = -F.logsigmoid(margins)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over the completion's tokens: [2B, T-1] per-token log-probs (0 off the
    mask) and the shifted completion mask -> [2B]."""
    return (token_logps * mask.to(token_logps.dtype)).sum(dim=1)


def dpo_batch_loss(
    policy: TokenStats, mask: torch.Tensor, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta
) -> DPOOutput:
    """`dpo_loss` on one [chosen; rejected] micro-batch: policy's per-token log-probs [2B, T-1], the shifted
    completion mask [2B, T-1], the reference's summed log-probs [B] each. The loss is the mean over the pairs."""
    chosen_logps, rejected_logps = sequence_logps(policy.logps, mask).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps.to(chosen_logps), ref_rejected_logps.to(rejected_logps), beta
    )  # (precomputed reference log-probs come from the CPU, in float32)
    return DPOOutput(
        loss=losses.mean(), chosen_logps=chosen_logps.detach(), rejected_logps=rejected_logps.detach(),
        chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, mask=mask, pair_losses=losses.detach(),
    )  # fmt: skip


def concatenated_inputs(model, batch: dict) -> ModelInputs:
    """What the model is called with: the padded [chosen; rejected] rows, and the completion tokens to score."""
    model_kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return ModelInputs(model_kwargs, labels=batch["input_ids"], loss_mask=batch["completion_mask"])


def concatenated_forward(policy, batch: dict, *, model_inputs, token_logps, reference, loss):
    """One micro-batch, down the reading path: model inputs -> the policy's log-probs -> the reference's -> loss.

    The four callables are chosen once, at setup (nanodpo/recipe.py): for the demo they are `concatenated_inputs`,
    nanodpo.logps.token_logps, a frozen reference model's log-probs and `dpo_batch_loss`.
    Returns (DPOOutput, the policy's TokenStats).
    """
    inputs = model_inputs(policy, batch)
    policy_stats = token_logps(policy, inputs)
    mask = batch["completion_mask"][:, 1:].to(policy_stats.logps.dtype)  # the labels' mask: shifted by one
    ref_chosen_logps, ref_rejected_logps = reference(policy, batch, inputs)
    return loss(policy_stats, mask, ref_chosen_logps, ref_rejected_logps), policy_stats
