"""Scale: what a long run on many GPUs needs and a learner may skip on a first read.

  checkpoint.py   save, resume (bit for bit, also sharded under FSDP2 / DeepSpeed) and stop cleanly
  faults.py       signals (SIGINT / SIGTERM) and non-finite steps: save and stop, lose nothing
"""
