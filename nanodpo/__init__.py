"""nanodpo: a minimal, readable trainer for causal language models (pretraining, SFT, DPO).

Where to read what, in the order a DPO batch goes (README "Read the code"):
  nanodpo/dpo_data.py     preference data: formats, prompt extraction, tokenization, the padded collator
  nanodpo/fast/dpo_packing.py  model inputs: padding-free and prefix-shared rows (--batch_layout)
  nanodpo/logps.py        token log-probs: the readable path (fast/chunked_head.py: the chunked head)
  nanodpo/reference.py    the reference policy's log-probs (and their on-disk cache)
  nanodpo/dpo.py          the DPO loss family (every TRL 1.16 loss type, with the paper equations)
  train_dpo.py            the DPO training loop, top to bottom
and for the other two scripts: sft_data.py, pt_data.py, packing.py, train_sft.py, train_pt.py. Shared by the loops:
training.py (accelerator, loaders, optimizer, schedule, gradient sync), checkpoint.py, tracking.py, config.py,
model.py, data.py.
"""

__version__ = "0.1.0"
