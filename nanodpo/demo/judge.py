"""Judges of Little World for online DPO: rules that score answers, called the way TRL calls reward functions.

    accelerate launch train_dpo.py --config configs/demo_online_dpo.yaml        # --judge nanodpo.demo.judge:politeness
    python train_dpo.py --online --judge nanodpo.demo.judge:politeness nanodpo.demo.judge:on_topic \
        --reward_weights 1.0 0.5 ...                                           # several judges, summed with weights

Each takes `prompts` and `completions` (strings, or for conversations [{"role": "assistant", "content": ...}]) and
returns one number per answer; train_dpo.py passes the prompt rows' other columns too, which these ignore.
"""

from nanodpo.demo import world


def politeness(prompts, completions, **columns) -> list[float]:
    """+1 for a polite answer, −1 for a blunt one, 0 for neither (`world.answer_style`: the style's marker phrases)."""
    scores = {"polite": 1.0, "blunt": -1.0}
    return [scores.get(world.answer_style(world._content(c)), 0.0) for c in completions]


def on_topic(prompts, completions, **columns) -> list[float]:
    """1 when the answer talks about what the question asked about (`world.on_topic`), else 0."""
    return [float(world.on_topic(p, c)) for p, c in zip(prompts, completions)]


def length(prompts, completions, **columns) -> list[float]:
    """The answer's length in characters / 100: a judge that rewards length, and nothing else. Online DPO then
    learns to talk until --max_new_tokens cuts it off (`python -m nanodpo.tools.plot --diagnose` says so)."""
    return [len(world._content(c)) / 100 for c in completions]
