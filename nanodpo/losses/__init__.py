"""The preference-loss family: every DPO loss type of TRL 1.16, and SimPO, CPO, ORPO and KTO beside them.

nanodpo/dpo.py is plain DPO (the sigmoid loss) as the paper writes it; this folder holds everything else, each
equation and citation once, in the tables below, in one notation:

  pair.py       the pair losses with a reference (first table), summed with --loss_weights: `weighted_pair_loss`
  modifiers.py  LD-DPO, f-DPO and WPO (the "Modifiers" below)
  family.py     simpo, cpo, orpo: whole losses without a reference
  kto.py        kto: unpaired rows and their KL reference point
  metrics.py    the logged values, as TRL names and reduces them
  options.py    the option checks, and the questions the setup asks (which loss, does it need a reference)

Which of them a run uses is chosen once, at setup (nanodpo/recipe.py); the training loop never asks.

Notation (all log-probs are of completion tokens only, summed, unless averaged as written)
=======================================================================================
    x, y_w, y_l     prompt, preferred ("chosen") and dispreferred ("rejected") completion; KTO: x, y and a label
    π_θ, π_ref      the policy being trained and the frozen reference (usually the SFT model)
    log π(y|x)      Σ over y's tokens of log π(y_t | x, y_<t)                                            [B]
    |y|             number of scored completion tokens
    ℓ(y)            log π_θ(y|x) / |y|: the average per-token log-prob (length-normalised)
    ρ(y)            log π_θ(y|x) - log π_ref(y|x): how much more likely than before; ρ_w = ρ(y_w), ρ_l = ρ(y_l)
    Δ, h            Δ = ρ_w - ρ_l (f-DPO: each ρ replaced by f'(e^ρ)); h = β·Δ
    r(y)            the reward each loss logs as `rewards/*`: β·ρ(y) (losses with π_ref), β·log π_θ(y|x) (cpo),
                    β·ℓ(y) (simpo, orpo)
    σ               the logistic function; -log σ(z) is the logistic loss of a "margin" z
    ε               --label_smoothing, the probability that a preference label is flipped
    NLL(y_w)        -mean over the tokens of the micro-batch's chosen completions of log π_θ (cpo, simpo, sft);
                    ORPO's (as TRL's) over every token of the chosen sequences, prompt included

Losses with a reference π_ref, on pairs (`--loss_type`, several summed with `--loss_weights`)
===========================================================================================
loss_type     per-pair loss                                                 source
------------  ------------------------------------------------------------  ------------------------------------------
sigmoid       -log σ(h)                                                     DPO, Rafailov et al. 2023, Eq. 7
  ... ε > 0   -(1-ε)·log σ(h) - ε·log σ(-h)   (conservative DPO, cDPO)      Mitchell 2023, "A note on DPO with noisy
                                                                            preferences"; TRL <= 0.28
hinge         max(0, 1 - h)                                                 SLiC-HF, Zhao et al. 2023 (§2); RSO,
                                                                            Liu et al. 2024 (hinge-norm)
ipo           (ρ_w/|y_w| - ρ_l/|y_l| - 1/(2β))²                             IPO, Azar et al. 2023, Eq. 17 (τ = β)
exo_pair      KL(q || p) over {y_w, y_l}, q = (σ(h), σ(-h)), p = (1-ε, ε)   EXO, Ji et al. 2024, Eq. 16
nca_pair      -log σ(βρ_w) - ½·log σ(-βρ_w) - ½·log σ(-βρ_l)                NCA, Chen et al. 2024 (pairwise, K = 2)
robust        [-(1-ε)·log σ(h) + ε·log σ(-h)] / (1 - 2ε)                    rDPO, Chowdhury et al. 2024 (§3)
bco_pair      -log σ(βρ_w) - log σ(-βρ_l)                                   BCO, Jung et al. 2024 (no reward shift δ)
sppo_hard     (ρ_w - 1/(2β))² + (ρ_l + 1/(2β))²                             SPPO, Wu et al. 2024, Eq. 4.7, P ∈ {1, 0}
aot           (cDPO) sigmoid loss of β·(sort(m_θ) - sort(m_ref)), where     AOT, Melnyk et al. 2024 (§3)
              m = log π(y_w|x) - log π(y_l|x), sorted over the micro-batch
aot_unpaired  (cDPO) sigmoid loss of β·(sort(ρ_w) - sort(ρ_l))              AOT, Melnyk et al. 2024 (§3, unpaired)
apo_zero      (1 - σ(βρ_w)) + σ(βρ_l)                                       APO, D'Oosterlinck et al. 2024, Eq. 7
apo_down      σ(βρ_w) + (1 - σ(β(ρ_w - ρ_l)))                               APO, D'Oosterlinck et al. 2024, Eq. 8
discopop      (1-m)·(-log σ(h)) + m·exp(-h),  m = σ(h/τ)                    DiscoPOP, Lu et al. 2024, Eq. 5
sigmoid_norm  -log σ(β·(ρ_w/|y_w| - ρ_l/|y_l|))                             length-normalised DPO (Tülu 3, Lambert
                                                                            et al. 2024)
sft           NLL(y_w) (no pair loss)                                       the NLL term of RPO / MPO

The rest of the family (`--loss_type` alone; each equals its TRL 1.16 trainer)
============================================================================
loss_type     loss of a micro-batch                                         source / TRL trainer
------------  ------------------------------------------------------------  ------------------------------------------
simpo         mean[-log σ(β·(ℓ(y_w) - ℓ(y_l)) - γ)] + α·NLL(y_w)            SimPO, Meng et al. 2024, Eq. 6;
              (ε > 0: smoothed as cDPO)  no π_ref; γ = --simpo_gamma,       CPOTrainer(loss_type="simpo")
              α = --cpo_alpha (default 0)
cpo           mean[-log σ(β·(log π_θ(y_w|x) - log π_θ(y_l|x)))]             CPO, Xu et al. 2024 (§3: L_prefer +
              + α·NLL(y_w); (ε > 0: smoothed as cDPO)  no π_ref;            L_NLL); CPOTrainer(loss_type="sigmoid")
              α = --cpo_alpha (default 1)
orpo          NLL(y_w) - λ·mean[log σ(log odds(y_w) - log odds(y_l))],      ORPO, Hong et al. 2024, Eq. 4, 6, 7;
              odds(y) = e^ℓ(y) / (1 - e^ℓ(y)); no π_ref; λ = --beta         ORPOTrainer
kto           mean over rows of  λ_D·(1 - σ(β·(ρ(y) - z_ref)))  (y desirable) KTO, Ethayarajh et al. 2024, Eq. 7;
                            or   λ_U·(1 - σ(β·(z_ref - ρ(y))))  (undesirable) KTOTrainer(loss_type="kto")
              z_ref = max(0, mean over the micro-batch (and processes) of ρ(y'_i|x_i)): the KL reference point,
              estimated on mismatched pairs without gradient; y'_i = the completion of the row before x_i in its
              block of --per_device_train_batch_size rows of the data as read (KTOTrainer's); λ_D, λ_U =
              --desirable_weight, --undesirable_weight

Each loss sees the token ids its TRL trainer makes (nanodpo/dpo_data.py): DPOTrainer's and KTOTrainer's for the
DPO losses and kto, CPOTrainer's and ORPOTrainer's for simpo, cpo and orpo. The trainers disagree: CPOTrainer and
ORPOTrainer (trl/experimental/{cpo,orpo}/*_trainer.py, `tokenize_row` and `build_tokenized_answer`) tokenize
without special tokens, prepend the BOS id whenever the tokenizer has a BOS token, append the EOS id, split a token
merged across the prompt/completion boundary per completion, and cut the completion to fit --max_length;
DPOTrainer and KTOTrainer (`_prepare_dataset`) let the tokenizer add its own special tokens, append the EOS token
as text, and let the collator cut the sequence (the table above `build_cpo_examples` lists every rule).

Modifiers (losses with π_ref only)
==================================
  --f_divergence_type  f-DPO (Wang et al. 2023, "Beyond Reverse KL"): replace each log-ratio ρ by f'(e^ρ) for the
                       regulariser's f (reverse KL gives back ρ). Only for the losses built on Δ alone
                       (F_DIVERGENCE_LOSS_TYPES): the leftover β·log Z(x) cancels only in the chosen - rejected
                       difference.
  --ld_alpha           LD-DPO (Liu et al. 2024, "Length Desensitization in DPO"): tokens past the shorter completion's
                       length count with weight α in the summed log-probs (policy and reference alike).
  --use_weighting      WPO (Zhou et al. 2024, Eq. 2): each pair's loss is multiplied by the policy's own
                       (detached) length-normalised probability of both completions.
  --rpo_alpha          RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): add α·NLL(y_w);
                       TRL 1.16 spells this `loss_type=[..., "sft"]`, `loss_weights=[..., α]`.
  --reference_free     take log π_ref = 0 (no reference model).

Differences from TRL 1.16 (everything else is tested equal to `DPOTrainer._compute_loss`, `CPOTrainer`,
`ORPOTrainer` and `KTOTrainer`):
  * `sigmoid` with label_smoothing > 0 is conservative DPO here (as in TRL <= 0.28 and the DPO authors' code);
    TRL 1.16 silently ignores label_smoothing for `sigmoid`.
  * `rpo_alpha` and `reference_free` were removed from TRL at 0.29; nanodpo keeps them (see above).
  * `sft` together with `use_weighting` crashes in TRL 1.16 (an in-place multiply on an expanded tensor); here the
    NLL term is weighted like every other term: NLL × mean over pairs of the WPO weights.
  * `ipo` / `sigmoid_norm` divide by the number of scored completion tokens (the shifted mask, as simpo and orpo
    do in TRL too). TRL's DPOTrainer counts the unshifted completion mask; the two agree unless a completion starts
    at position 0 (empty prompt), where that first token has no prediction and so no log-prob.
  * cpo / simpo log `nll_loss` even with --cpo_alpha 0 (TRL logs 0 there).
  * simpo, cpo and orpo log the mean logit over the completion tokens (DPOTrainer's and KTOTrainer's `logits/*`)
    as `completion_logits/chosen|rejected`, not as `logits/*`: under that name CPOTrainer logs the mean over every
    position of the padded [chosen; rejected] batch, prompt and padding included (cpo_trainer.py
    `get_batch_loss_metrics`, on all of `concatenated_forward`'s logits), ORPOTrainer the same without the last
    position (orpo_trainer.py `concatenated_forward`: `all_logits[:, :-1]`) — a value that depends on the padding,
    which the packed layouts do not have.
  * simpo, cpo and orpo drop a pair whose prompt alone reaches --max_length (as nanodpo's DPO does); CPOTrainer and
    ORPOTrainer keep it with no completion token, where simpo's and orpo's average log-prob is 0/0. They render a
    row's `tools` column into the chat template, as DPOTrainer and KTOTrainer do (CPOTrainer and ORPOTrainer map
    `maybe_apply_chat_template` without it), and --max_length none cuts nothing (those two then use 512).
  * kto: TRL's KTOTrainer refuses any data order but `train_sampling_strategy="sequential"`, because its mismatched
    completions are fixed per block of rows when the data is prepared. nanodpo fixes them the same way (blocks of
    --per_device_train_batch_size, eval rows too) and also shuffles: each row keeps its pair, so a shuffled run is
    what KTOTrainer's pairs give under a shuffled sampler (tests/test_kto.py runs KTOTrainer so).
"""
