"""Chapter two: the fast path. The same numbers as the readable path, with less memory and less wasted compute.

  chunked_head.py   log-probs without the [batch, seq, vocab] logits: the LM head runs only at the scored tokens,
                    a chunk at a time (`--logps chunked`)
  dpo_packing.py    DPO batches without padding or a repeated prompt: padding-free and prefix-shared rows
                    (`--batch_layout padding_free|prefix_shared`)

Each is entered from one line chosen at setup (train_*.py) and is proven equal to the readable path
(tests/test_fastpath.py, tests/test_dpo_packing.py).
"""
