"""Supervised fine-tuning on conversations with assistant-only loss.

Not yet implemented: this stage lands with the PT/SFT issue. Use train_dpo.py for DPO.
"""

import sys

if __name__ == "__main__":
    print("train_sft.py: not yet implemented (see the PT/SFT issue); train_dpo.py is ready.", file=sys.stderr)
    sys.exit(1)
