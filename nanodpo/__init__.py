"""nanodpo: a minimal, readable trainer for causal language models (pretraining, SFT, DPO).

Read one DPO step in this order (the readable path: what the demo runs):
  train_dpo.py            the loop, top to bottom; its step's callables are chosen once, in recipe.py
  nanodpo/dpo.py          the DPO loss as the paper writes it, and the concatenated [chosen; rejected] forward
  nanodpo/logps.py        per-token log-probs: log_softmax + gather
  nanodpo/dpo_batch.py    the collator: examples -> one [chosen; rejected] batch
  nanodpo/reference.py    where the reference policy's log-probs come from
  nanodpo/training.py     what the three loops share: accelerator, loaders, schedule, gradient sync, the update rule
and, for the other scripts: train_sft.py, train_pt.py, sft_data.py, pt_data.py, packing.py.

The layers, bottom to top (no module imports a higher one: tests/test_layers.py):
  data        data.py, llamafactory.py, dpo_data.py, sft_data.py, pt_data.py, packing.py, dpo_batch.py
  model       model.py (loading, LoRA, the nanodpo-tiny preset), generation.py (sampling with a KV cache)
  log-probs   logps.py, fast/ (chapter two: the chunked LM head, padding-free and prefix-shared rows)
  losses      dpo.py, losses/ (the rest of the family, its options and metrics)
  loop        recipe.py, reference.py, training.py, tracking.py, scale/ (checkpoints, faults, sharding),
              online.py (online DPO: pairs sampled by the policy and ranked by judges)
  on top      the scripts, tools/ (plot, chat, merge, bench, memplan), demo/ (the offline demo)
"""

__version__ = "0.1.0"
