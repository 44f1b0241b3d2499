"""nanodpo: a minimal, readable trainer for causal language models (pretraining, SFT, DPO).

Where to read what:
  nanodpo/dpo.py        the DPO loss family (every TRL 1.16 loss type, with the paper equations)
  nanodpo/logps.py      per-token log-probs: log_softmax + gather, masked sums
  nanodpo/dpo_data.py   preference data: formats, prompt extraction, tokenization, collator
  nanodpo/data.py       loading rows from files and hub datasets
  nanodpo/config.py     the options of every script (dataclasses, YAML + CLI)
  nanodpo/model.py      loading models/tokenizers, 4-bit, LoRA, the reference model
  train_dpo.py          the DPO training loop, top to bottom
"""

__version__ = "0.1.0"
