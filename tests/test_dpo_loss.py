"""nanodpo/dpo.py against TRL 1.16's `DPOTrainer._compute_loss`, plus hand-derived values for what TRL lacks.

TRL has no standalone DPO loss function: the math lives inline in `_compute_loss`, which calls the policy (and, unless
the reference log-probs are precomputed, `trainer.ref_model`) with `fused_lm_head=True`. So we build one real
DPOTrainer on a tiny model and drive `_compute_loss` with stub models that return fixed per-token tensors
(`FusedCausalLMOutput`), and give nanodpo the very same tensors as a TokenStats. Loss, gradients and every logged
metric must agree to 1e-6.
"""

import ast
import inspect
import math
import re
import warnings
from dataclasses import dataclass
from functools import partial

import pytest
import torch

from nanodpo.config import DPOConfig
from nanodpo.dpo import dpo_batch_loss
from nanodpo.errors import UserError
from nanodpo.logps import TokenStats, token_stats
from nanodpo.losses.metrics import dpo_metrics
from nanodpo.losses.modifiers import completion_logps, reference_logps
from nanodpo.losses.options import F_DIVERGENCE_LOSS_TYPES, LOSS_TYPES, check_dpo_options, resolved_losses
from nanodpo.losses.pair import preference_loss, weighted_pair_loss
from nanodpo.recipe import choose_loss, is_plain_dpo
from tests import tiny

trl = pytest.importorskip("trl")
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head  # noqa: E402

TOL = dict(rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Fixed per-token inputs: 4 pairs, varied prompt and completion lengths, policy != reference.


@dataclass
class Batch:
    inputs: dict  # what TRL's collator would give: input_ids, attention_mask, completion_mask  [2B, T]
    mask: torch.Tensor  # shifted completion mask, float  [2B, T-1]
    policy_logps: torch.Tensor  # [2B, T-1], 0 off the mask
    ref_logps: torch.Tensor
    entropy: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor
    log_sum_sq_probs: torch.Tensor


def make_batch(seed: int = 0) -> Batch:
    # Pair i = rows i (chosen) and 4 + i (rejected). Pair 2 has equal lengths (LD-DPO leaves it alone).
    prompt_lengths = [3, 5, 2, 4, 4, 3, 6, 2]
    completion_lengths = [6, 14, 18, 9, 11, 7, 18, 5]
    rows, width = len(prompt_lengths), 26
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 500, (rows, width), generator=g)
    completion_mask = torch.zeros(rows, width, dtype=torch.long)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompt_lengths, completion_lengths)):
        completion_mask[row, prompt : prompt + completion] = 1
        attention_mask[row, : prompt + completion] = 1
        input_ids[row, prompt + completion :] = 0  # padding
    mask = completion_mask[:, 1:].float()
    shape = mask.shape
    # Per-token log-probs in (-3, -0.02): summed over 5-18 tokens that is -10 to -30, like real completions.
    policy_logps = -(torch.rand(shape, generator=g) * 3 + 0.02) * mask
    ref_logps = (policy_logps + 0.4 * torch.randn(shape, generator=g)).clamp(max=-1e-3) * mask
    log_sum_sq_probs = 2 * policy_logps * torch.rand(shape, generator=g)  # log Σp² lies in [2·log p_label, 0]
    return Batch(
        inputs={"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask},
        mask=mask,
        policy_logps=policy_logps,
        ref_logps=ref_logps,
        entropy=torch.rand(shape, generator=g) * 4 * mask,
        mean_logits=torch.randn(shape, generator=g) * 2 * mask,
        is_top1=(torch.rand(shape, generator=g) < 0.4) & mask.bool(),
        log_sum_sq_probs=log_sum_sq_probs,
    )


class StubModel:
    """Stands in for a model patched with `add_fused_lm_head`: returns fixed per-token tensors."""

    def __init__(self, output: FusedCausalLMOutput):
        self.output = output
        self.calls = []

    def __call__(self, **kwargs):
        assert kwargs.get("fused_lm_head") is True
        self.calls.append(kwargs)
        return self.output


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    from datasets import Dataset

    tokenizer = tiny.make_tokenizer()
    args = trl.DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl_dpo")),
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        precompute_ref_log_probs=False,
        per_device_train_batch_size=4,
        max_length=64,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=tiny.make_model(tokenizer, seed=0),
        ref_model=tiny.make_model(tokenizer, seed=1),
        args=args,
        train_dataset=Dataset.from_list(tiny.preference_rows(4, "explicit")),
        processing_class=tokenizer,
    )
    trainer.model.train()  # _compute_loss logs under "train" when self.model.training
    return trainer


def nanodpo_config(**overrides) -> DPOConfig:
    cfg = DPOConfig(**overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_dpo_options(cfg)  # every case must be a valid nanodpo configuration
    return cfg


def run_trl(trainer, batch: Batch, cfg: DPOConfig, with_grad: bool = False):
    """TRL's loss (and the grad wrt the per-token policy log-probs) and its logged metrics for this batch."""
    trainer.beta = cfg.beta
    trainer.loss_types = list(cfg.loss_type)
    trainer.loss_weights = list(cfg.loss_weights) if cfg.loss_weights else [1.0] * len(cfg.loss_type)
    trainer.label_smoothing = cfg.label_smoothing
    trainer.f_divergence_type = cfg.f_divergence_type
    trainer.f_alpha_divergence_coef = cfg.f_alpha_divergence_coef
    trainer.ld_alpha = cfg.ld_alpha
    trainer.use_weighting = cfg.use_weighting
    trainer.args.discopop_tau = cfg.discopop_tau
    trainer.precompute_ref_logps = False
    trainer._metrics["train"].clear()

    policy_logps = batch.policy_logps.clone().requires_grad_(with_grad)
    policy = StubModel(
        FusedCausalLMOutput(
            log_probs=policy_logps,
            entropy=batch.entropy,
            mean_logits=batch.mean_logits,
            is_top1=batch.is_top1,
            log_sum_sq_probs=batch.log_sum_sq_probs,
        )
    )
    trainer.ref_model = StubModel(FusedCausalLMOutput(log_probs=batch.ref_logps))
    loss = trainer._compute_loss(policy, dict(batch.inputs), return_outputs=False)
    # TRL scores exactly the completion tokens: labels are -100 elsewhere
    labels = policy.calls[0]["labels"]
    assert torch.equal(labels != -100, batch.inputs["completion_mask"].bool())
    grad = torch.autograd.grad(loss, policy_logps)[0] if with_grad else None
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items() if name != "num_tokens"}
    return loss.detach(), grad, metrics


def run_nanodpo(batch: Batch, cfg: DPOConfig, with_grad: bool = False):
    policy_logps = batch.policy_logps.clone().requires_grad_(with_grad)
    stats = TokenStats(
        logps=policy_logps,
        mask=batch.mask,
        entropy=batch.entropy,
        mean_logits=batch.mean_logits,
        is_top1=batch.is_top1,
        log_sum_sq_probs=batch.log_sum_sq_probs,
    )
    if cfg.reference_free:
        ref_chosen, ref_rejected = None, None
    else:
        ref_chosen, ref_rejected = reference_logps(batch.ref_logps, batch.mask, cfg.ld_alpha)
    out = choose_loss(cfg)(stats, batch.mask, ref_chosen, ref_rejected)  # what train_dpo.py runs for cfg
    grad = torch.autograd.grad(out.loss, policy_logps)[0] if with_grad else None
    return out, grad, dpo_metrics(out, stats)


def assert_metrics_equal(ours: dict, theirs: dict):
    assert set(ours) - {"nll_loss"} == set(theirs), (sorted(ours), sorted(theirs))
    for name, value in theirs.items():
        assert math.isclose(ours[name], value, rel_tol=1e-6, abs_tol=1e-6), (name, ours[name], value)


# ----------------------------------------------------------------------------------------------------------------
# Parity cases


SINGLE = [dict(loss_type=[t]) for t in LOSS_TYPES if t not in ("exo_pair", "robust")]
SINGLE += [
    dict(loss_type=["exo_pair"], label_smoothing=1e-3),
    dict(loss_type=["exo_pair"], label_smoothing=0.2, beta=0.5),
    dict(loss_type=["robust"]),
    dict(loss_type=["robust"], label_smoothing=0.1),
    dict(loss_type=["robust"], label_smoothing=0.3, beta=0.5),
    dict(loss_type=["aot"], label_smoothing=0.1),
    dict(loss_type=["aot_unpaired"], label_smoothing=0.2, beta=0.5),
    dict(loss_type=["sigmoid"], beta=0.5),
    dict(loss_type=["hinge"], beta=0.5),
    dict(loss_type=["ipo"], beta=0.5),
    dict(loss_type=["sppo_hard"], beta=0.5),
    dict(loss_type=["apo_down"], beta=1.0),
    dict(loss_type=["discopop"], discopop_tau=0.5, beta=0.5),
]
COMBINATIONS = [
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
    dict(loss_type=["ipo", "sigmoid_norm"], loss_weights=[0.5, 2.0]),
    dict(loss_type=["aot", "apo_zero", "nca_pair"], loss_weights=[1.0, 0.3, 0.7], label_smoothing=0.05),
    dict(loss_type=["hinge", "sft"], loss_weights=[1.0, 0.3]),
    dict(loss_type=["robust", "exo_pair", "sppo_hard"], loss_weights=[1.0, 1.0, 0.1], label_smoothing=0.1),
    dict(loss_type=["sigmoid", "sigmoid"]),
]
F_DIVERGENCE = [
    dict(loss_type=[t], f_divergence_type=f, f_alpha_divergence_coef=coef, **extra)
    for f, coef in [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 0.3),
                    ("alpha_divergence", 1.0), ("alpha_divergence", 1.5)]
    for t, extra in [("sigmoid", {}), ("hinge", {}), ("ipo", {}), ("exo_pair", {"label_smoothing": 0.01}),
                     ("robust", {"label_smoothing": 0.2}), ("discopop", {}), ("sigmoid_norm", {})]
]  # fmt: skip
F_DIVERGENCE += [
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], f_divergence_type="js_divergence"),
    dict(loss_type=["ipo", "robust"], f_divergence_type="forward_kl", label_smoothing=0.1, beta=0.5),
]
WEIGHTING = [
    dict(loss_type=[t], use_weighting=True, **extra)
    for t, extra in [("sigmoid", {}), ("ipo", {}), ("robust", {"label_smoothing": 0.1}), ("bco_pair", {}),
                     ("apo_zero", {}), ("discopop", {}), ("sigmoid_norm", {}), ("exo_pair", {"label_smoothing": 0.1})]
]  # fmt: skip
WEIGHTING += [
    dict(loss_type=["sigmoid", "hinge"], loss_weights=[0.6, 0.4], use_weighting=True),
    dict(loss_type=["sigmoid"], use_weighting=True, ld_alpha=0.5),
    dict(loss_type=["sigmoid"], use_weighting=True, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.7),
]
LD_ALPHA = [
    dict(loss_type=[t], ld_alpha=alpha)
    for alpha in (0.0, 0.5, 1.0)
    for t in ("sigmoid", "ipo", "apo_down", "aot", "sppo_hard")
]
LD_ALPHA += [
    dict(loss_type=["sigmoid", "sft"], ld_alpha=0.3),
    dict(loss_type=["sigmoid_norm"], ld_alpha=0.5, f_divergence_type="forward_kl"),
]
CASES = SINGLE + COMBINATIONS + F_DIVERGENCE + WEIGHTING + LD_ALPHA


def case_id(case: dict) -> str:
    return "-".join(f"{k}={'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_loss_and_metrics_match_trl(trl_trainer, case):
    batch = make_batch(seed=len(case_id(case)))  # a different batch for different cases, deterministic
    cfg = nanodpo_config(**case)
    trl_loss, _, trl_metrics = run_trl(trl_trainer, batch, cfg)
    out, _, metrics = run_nanodpo(batch, cfg)
    torch.testing.assert_close(out.loss.detach(), trl_loss, **TOL)
    assert_metrics_equal(metrics, trl_metrics)
    assert (out.nll_loss is not None) == any(t == "sft" for t, _ in resolved_losses(cfg))


GRAD_CASES = [
    dict(loss_type=["sigmoid"]),
    dict(loss_type=["ipo"], use_weighting=True, ld_alpha=0.5),
    dict(loss_type=["aot"], label_smoothing=0.1),
    dict(loss_type=["discopop"], f_divergence_type="js_divergence"),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type=["robust", "sigmoid_norm"], label_smoothing=0.2, f_divergence_type="alpha_divergence"),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[case_id(c) for c in GRAD_CASES])
def test_gradients_match_trl(trl_trainer, case):
    batch = make_batch(seed=7)
    cfg = nanodpo_config(**case)
    trl_loss, trl_grad, _ = run_trl(trl_trainer, batch, cfg, with_grad=True)
    out, grad, _ = run_nanodpo(batch, cfg, with_grad=True)
    torch.testing.assert_close(out.loss.detach(), trl_loss, **TOL)
    assert grad.abs().max() > 0
    on = batch.mask.bool()
    torch.testing.assert_close(grad[on], trl_grad[on], **TOL)
    # Off the mask TRL's unmasked row sum sends gradient into positions whose log-prob the fused head has already
    # zeroed (masked_fill), so it stops there; nanodpo multiplies by the mask, so none leaves those positions at all.
    assert torch.all(grad[~on] == 0)


def test_sft_with_weighting_crashes_in_trl_and_is_weighted_here(trl_trainer):
    """TRL 1.16 multiplies the expanded (broadcast) sft tensor in place and crashes; nanodpo weights the NLL term
    like any other: NLL × mean over pairs of the WPO weights."""
    batch = make_batch(seed=3)
    cfg = nanodpo_config(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], use_weighting=True)
    with pytest.raises(RuntimeError, match="single memory location"):
        run_trl(trl_trainer, batch, cfg)
    out, _, _ = run_nanodpo(batch, cfg)
    sigmoid_only, _, _ = run_nanodpo(batch, nanodpo_config(loss_type=["sigmoid"], use_weighting=True))
    # WPO weights by hand: exp(mean over the completion of (log p - log Σp²)), multiplied over the pair
    weights = []
    for row in range(8):
        on = batch.mask[row].bool()
        aligned = (batch.policy_logps[row][on] - batch.log_sum_sq_probs[row][on]).double()
        weights.append(math.exp(aligned.mean().item()))
    pair_weights = [weights[i] * weights[4 + i] for i in range(4)]
    chosen_tokens = torch.cat([batch.policy_logps[i][batch.mask[i].bool()] for i in range(4)]).double()
    nll = -chosen_tokens.mean().item()
    expected = sigmoid_only.loss.item() + 0.5 * nll * sum(pair_weights) / 4
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(out.nll_loss.item(), nll, rel_tol=1e-6)


def test_trl_option_lists_match():
    """LOSS_TYPES and F_DIVERGENCE_LOSS_TYPES are TRL 1.16's, read from its source (guards against TRL drift)."""
    init_source = inspect.getsource(trl.DPOTrainer.__init__)
    found = re.search(r"f_divergence_loss_types = (\{[^}]*\})", init_source)
    assert ast.literal_eval(found.group(1)) == set(F_DIVERGENCE_LOSS_TYPES)
    loss_source = inspect.getsource(trl.DPOTrainer._compute_loss)
    trl_loss_types = re.findall(r'loss_type == "(\w+)"', loss_source)
    assert sorted(set(trl_loss_types)) == sorted(LOSS_TYPES)


# ----------------------------------------------------------------------------------------------------------------
# Beyond TRL: hand-derived values


def logsigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def docstring_example():
    """The module docstring's worked example: per-token values summing to policy [-12, -8, -15, -9] and reference
    [-13, -8.5, -14, -9.5], with one padded position in row 1 (the chosen completion of pair 1 is 2 tokens)."""
    policy = torch.tensor([[-5.0, -4.0, -3.0], [-6.0, -2.0, 0.0], [-7.0, -7.0, -1.0], [-4.0, -4.0, -1.0]])
    ref = torch.tensor([[-6.0, -4.0, -3.0], [-6.5, -2.0, 0.0], [-6.0, -7.0, -1.0], [-4.5, -4.0, -1.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    return policy, ref, mask


def test_docstring_worked_example():
    policy, ref, mask = docstring_example()
    stats = TokenStats(logps=policy.clone().requires_grad_(), mask=mask)
    ref_chosen, ref_rejected = reference_logps(ref, mask)
    assert ref_chosen.tolist() == [-13.0, -8.5] and ref_rejected.tolist() == [-14.0, -9.5]
    cfg = nanodpo_config(beta=0.1)
    assert is_plain_dpo(cfg)
    out = dpo_batch_loss(stats, mask, ref_chosen, ref_rejected, beta=0.1)  # nanodpo/dpo.py, the paper's loss
    assert out.chosen_logps.tolist() == [-12.0, -8.0] and out.rejected_logps.tolist() == [-15.0, -9.0]
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.1, 0.05]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.1, 0.05]))
    expected = (-logsigmoid(0.2) - logsigmoid(0.0)) / 2
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-6)
    assert round(expected, 4) == 0.6456
    metrics = dpo_metrics(out, stats)
    assert metrics["rewards/accuracies"] == 0.5  # 0.05 > 0.05 is a tie, not a win
    assert math.isclose(metrics["rewards/margins"], 0.1, rel_tol=1e-6)
    out.loss.backward()  # reaches the per-token log-probs
    assert stats.logps.grad is not None


def test_the_papers_loss_equals_the_general_pair_loss():
    """nanodpo/dpo.py's `dpo_batch_loss` (what plain sigmoid DPO runs) and losses/pair.py's `weighted_pair_loss`
    (every other loss type) give the same numbers and gradients for --loss_type sigmoid: bit for bit."""
    torch.manual_seed(0)
    policy = torch.randn(6, 9) * 3
    mask = (torch.rand(6, 9) > 0.3).float()
    ref_chosen, ref_rejected = torch.randn(3) * 5, torch.randn(3) * 5
    grads, outs = [], []
    for loss in (partial(dpo_batch_loss, beta=0.3), partial(weighted_pair_loss, cfg=nanodpo_config(beta=0.3))):
        logps = policy.clone().requires_grad_()
        out = loss(TokenStats(logps=logps * mask, mask=mask), mask, ref_chosen, ref_rejected)
        grads.append(torch.autograd.grad(out.loss, logps)[0])
        outs.append(out)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
    for name in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "pair_losses"):
        assert torch.equal(getattr(outs[0], name), getattr(outs[1], name)), name


def test_conservative_dpo_label_smoothing_on_sigmoid():
    policy, ref, mask = docstring_example()
    ref_chosen, ref_rejected = reference_logps(ref, mask)
    with pytest.warns(UserWarning, match="TRL 1.16 ignores"):
        cfg = DPOConfig(beta=0.1, label_smoothing=0.1)
        check_dpo_options(cfg)
    out = weighted_pair_loss(TokenStats(logps=policy, mask=mask), mask, ref_chosen, ref_rejected, cfg)
    # margins 0.2 and 0.0: -(1-ε)·log σ(m) - ε·log σ(-m)
    per_pair = [-0.9 * logsigmoid(m) - 0.1 * logsigmoid(-m) for m in (0.2, 0.0)]
    assert math.isclose(out.loss.item(), sum(per_pair) / 2, rel_tol=1e-6)
    # cDPO penalises over-confidence: at a large margin its loss grows like ε·margin instead of going to 0
    losses, _, _ = preference_loss(
        torch.tensor([100.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
        beta=1.0, loss_type="sigmoid", label_smoothing=0.1,
    )  # fmt: skip
    assert math.isclose(losses.item(), 0.1 * 100, rel_tol=1e-4)  # -ε·log σ(-100) ≈ ε·100


def test_rpo_alpha_adds_chosen_nll():
    policy, ref, mask = docstring_example()
    ref_chosen, ref_rejected = reference_logps(ref, mask)
    cfg = nanodpo_config(beta=0.1, rpo_alpha=0.5)
    assert resolved_losses(cfg) == [("sigmoid", 1.0), ("sft", 0.5)]
    stats = TokenStats(logps=policy, mask=mask)
    out = weighted_pair_loss(stats, mask, ref_chosen, ref_rejected, cfg)
    # NLL: mean over the 5 chosen completion tokens (rows 0 and 1): (5 + 4 + 3 + 6 + 2) / 5 = 4
    assert math.isclose(out.nll_loss.item(), 4.0, rel_tol=1e-7)
    dpo = (-logsigmoid(0.2) - logsigmoid(0.0)) / 2
    assert math.isclose(out.loss.item(), dpo + 0.5 * 4.0, rel_tol=1e-6)
    assert dpo_metrics(out, stats)["nll_loss"] == pytest.approx(4.0)
    # the same as TRL 1.16's spelling
    trl_spelling = nanodpo_config(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    same = weighted_pair_loss(stats, mask, ref_chosen, ref_rejected, trl_spelling)
    assert same.loss.item() == out.loss.item()


def test_reference_free():
    policy, _, mask = docstring_example()
    cfg = nanodpo_config(beta=0.1, reference_free=True)
    out = weighted_pair_loss(TokenStats(logps=policy, mask=mask), mask, None, None, cfg)
    # log π_ref = 0: margins are β·(chosen - rejected) = 0.1·(-12 + 15), 0.1·(-8 + 9)
    expected = (-logsigmoid(0.3) - logsigmoid(0.1)) / 2
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([-1.2, -0.8]))
    with pytest.raises(ValueError, match="reference"):
        weighted_pair_loss(TokenStats(logps=policy, mask=mask), mask, None, None, nanodpo_config())


def test_ld_alpha_by_hand():
    # Row 0 (chosen): prompt of 2 positions, then 4 completion tokens; row 1 (rejected): 2 completion tokens + pad.
    token_logps = torch.tensor([[0.0, 0.0, -1.0, -2.0, -3.0, -4.0], [0.0, -5.0, -6.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
    # shared length = min(4, 2) = 2: chosen = -1 - 2 + α(-3 - 4); rejected has no tail
    assert completion_logps(token_logps, mask, 0.5).tolist() == [-6.5, -11.0]
    assert completion_logps(token_logps, mask, 0.0).tolist() == [-3.0, -11.0]
    assert completion_logps(token_logps, mask, 1.0).tolist() == completion_logps(token_logps, mask).tolist()
    assert completion_logps(token_logps, mask).tolist() == [-10.0, -11.0]


def test_ipo_by_hand():
    # ρ_w = 2 over 4 tokens, ρ_l = -3 over 2 tokens, β = 0.25: (2/4 + 3/2 - 1/(2·0.25))² = (2 - 2)² = 0
    args = (torch.tensor([-8.0]), torch.tensor([-9.0]), torch.tensor([-10.0]), torch.tensor([-6.0]))
    lengths = dict(chosen_lengths=torch.tensor([4.0]), rejected_lengths=torch.tensor([2.0]))
    losses, _, _ = preference_loss(*args, beta=0.25, loss_type="ipo", **lengths)
    assert losses.item() == 0.0
    losses, _, _ = preference_loss(*args, beta=0.5, loss_type="ipo", **lengths)
    assert math.isclose(losses.item(), (2.0 - 1.0) ** 2)
    with pytest.raises(ValueError, match="sft"):
        preference_loss(*args, beta=0.5, loss_type="sft")


# ----------------------------------------------------------------------------------------------------------------
# Option checks


REFUSED = [
    (dict(loss_type=["dpo"]), "--loss_type"),
    (dict(loss_type=[]), "--loss_type"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "--loss_weights"),
    (dict(loss_type=["nca_pair"], f_divergence_type="forward_kl"), "--f_divergence_type"),
    (dict(loss_type=["sigmoid", "bco_pair"], f_divergence_type="js_divergence"), "--f_divergence_type"),
    (dict(loss_type=["aot"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0), "--f_divergence_type"),
    (dict(loss_type=["exo_pair"]), "--label_smoothing"),
    (dict(loss_type=["exo_pair"], label_smoothing=1.0), "--label_smoothing"),
    (dict(loss_type=["robust"], label_smoothing=0.5), "--label_smoothing"),
    (dict(loss_type=["robust"], label_smoothing=-0.1), "--label_smoothing"),
    (dict(loss_type=["hinge"], label_smoothing=1.5), "--label_smoothing"),
    (dict(loss_type=["aot"], use_weighting=True), "--use_weighting"),
    (dict(loss_type=["sigmoid", "aot_unpaired"], use_weighting=True), "--use_weighting"),
    (dict(loss_type=["sigmoid", "sft"], rpo_alpha=1.0), "--rpo_alpha"),
    (dict(reference_free=True, precompute_ref_logps=True), "--reference_free"),
    (dict(ld_alpha=1.5), "--ld_alpha"),
    (dict(ld_alpha=-0.1), "--ld_alpha"),
    (dict(beta=0.0), "--beta"),
    (dict(loss_type=["discopop"], discopop_tau=0.0), "--discopop_tau"),
    (dict(f_divergence_type="chi2"), "--f_divergence_type"),
]


@pytest.mark.parametrize("overrides,flag", REFUSED, ids=[case_id(o) for o, _ in REFUSED])
def test_refused_options(overrides, flag):
    with pytest.raises(UserError, match=re.escape(flag)) as err:
        check_dpo_options(DPOConfig(**overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
        dict(loss_type=["sigmoid"], rpo_alpha=0.5, f_divergence_type="forward_kl"),
        dict(loss_type=["exo_pair"], label_smoothing=1e-3),
        dict(loss_type=["robust"], label_smoothing=0.49),
        dict(loss_type=["ipo"], use_weighting=True, ld_alpha=0.0),
        dict(reference_free=True),
    ],
)
def test_accepted_options(overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_dpo_options(DPOConfig(**overrides))


# ----------------------------------------------------------------------------------------------------------------
# nanodpo.logps.token_stats against TRL's fused LM head on a real tiny model


def test_token_stats_match_trl_fused_lm_head():
    tokenizer = tiny.make_tokenizer()
    model = tiny.make_model(tokenizer, seed=3).eval()
    rows = tiny.preference_rows(4, "explicit")
    sequences, completion_masks = [], []
    for row in rows:
        for completion in (row["chosen"], row["rejected"]):
            prompt_ids = tokenizer(row["prompt"]).input_ids
            completion_ids = tokenizer(completion).input_ids + [tokenizer.eos_token_id]
            sequences.append(prompt_ids + completion_ids)
            completion_masks.append([0] * len(prompt_ids) + [1] * len(completion_ids))
    width = max(map(len, sequences))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    completion_mask = torch.tensor([m + [0] * (width - len(m)) for m in completion_masks])

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    with torch.no_grad():
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        fused = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    stats = token_stats(logits, input_ids, completion_mask, with_metrics=True, with_sum_sq=True)

    assert torch.equal(stats.mask.bool(), fused.label_mask)
    for name in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        ours = stats.logps if name == "log_probs" else getattr(stats, name)
        torch.testing.assert_close(ours, getattr(fused, name), rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(stats.is_top1, fused.is_top1)
    # and the summed log-probs nanodpo feeds the loss are TRL's
    torch.testing.assert_close(completion_logps(stats.logps, stats.mask), fused.log_probs.sum(1), rtol=1e-5, atol=1e-5)
