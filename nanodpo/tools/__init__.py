"""Tools around training, each a command: `python -m nanodpo.tools.<name> --help`.

  plot.py      draw metrics.jsonl, and say in words what the curves mean (--diagnose)
  chat.py      talk to a trained model (or two side by side, --compare)
  merge.py     merge a LoRA adapter into its base model
  bench.py     speed and memory against TRL, measured side by side in one run
  memplan.py   what a run will need in GPU memory, computed before it starts
"""
