"""Judges for the online DPO tests: deterministic scores of the answers' text, and judges that break."""


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def char_score(prompts, completions, **columns) -> list[float]:
    """A number from the answer's characters, rarely the same for two answers (so pairs are ranked)."""
    return [sum(ord(ch) * (i + 1) for i, ch in enumerate(_text(c))) % 997 / 100 for c in completions]


def needs_row(prompts, completions, row):
    """Reads the prompt rows' `row` column (passed as a keyword argument, repeated for the two answers)."""
    return [float(r) + len(_text(c)) / 1000 for r, c in zip(row, completions)]


def one_short(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1)


def nan_for_empty(prompts, completions, **columns):
    return [float("nan") if not _text(c) else 1.0 for c in completions]
