"""Pretraining a causal LM (from scratch or continued) with sequence packing.

Not yet implemented: this stage lands with the PT/SFT issue. Use train_dpo.py for DPO.
"""

import sys

if __name__ == "__main__":
    print("train_pt.py: not yet implemented (see the PT/SFT issue); train_dpo.py is ready.", file=sys.stderr)
    sys.exit(1)
