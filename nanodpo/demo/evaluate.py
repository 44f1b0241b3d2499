"""How did DPO change the demo model? Answer held-out questions and count the styles.

    from nanodpo.demo.evaluate import style_rate, style_report
    style_rate("out/demo/dpo", "out/demo/data/heldout.jsonl")
    # {"n": 100, "polite": 0.97, "blunt": 0.02, "neither": 0.01, "on_topic": 0.99, "correct": 0.81, ...}
    print(style_report("out/demo/sft", "out/demo/dpo", "out/demo/data/heldout.jsonl"))
    python -m nanodpo.demo.evaluate out/demo/sft out/demo/dpo      # the same report from the command line

Each held-out row is {"prompt": [system, user], "fact", "lang"}: a question never seen in any training set (its
fact was, in other words), asked with the demo's system prompt (world.SYSTEM_PROMPT, the one the models were
trained with). The answer is greedy (the most likely token each time, as `python -m nanodpo.tools.chat` by default) and
judged by `world.answer_style` (polite / blunt / neither, by marker phrases), `world.on_topic` (mentions what was
asked about) and `world.is_correct` (states the right fact).

Why about 50% after SFT: the SFT model learned both styles equally, but greedy decoding takes the single most likely
first token, and the openers are not spread evenly over first tokens — "Ugh" starts two of the four blunt English
openers, "好" two of the four polite Chinese ones. So greedily the SFT model answers English questions bluntly and
Chinese ones politely (the report shows both languages); sampling (`nanodpo.tools.chat --temperature 1`) mixes them.
After DPO both languages are polite.

Generation runs many questions at once: the prompts are left-padded to one length, so every row's next token sits
in the last column, and each step feeds one new token per row through the KV cache (what `nanodpo.tools.chat` does for
one conversation, row-wise). A row that has produced its end-of-turn token is finished; the loop stops when all are.
"""

import argparse
import json
import sys
import unicodedata
from pathlib import Path

import torch
from transformers.utils import logging

from nanodpo.demo import world
from nanodpo.tools.chat import load_for_chat, new_kv_cache, render_prompt, stop_token_ids


def load_heldout(path: str | Path, n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:n] if n is not None else rows


@torch.no_grad()
def generate_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 96) -> list[str]:
    """Greedy answers to several conversations at once (left padding; stops at the end-of-turn token)."""
    device = next(model.parameters()).device
    prompts = [tokenizer(render_prompt(tokenizer, c), add_special_tokens=False).input_ids for c in conversations]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    # Positions count real tokens only, so a left-padded prompt is seen exactly as the same prompt alone.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(stop_token_ids(model, tokenizer)), device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    answers: list[list[int]] = [[] for _ in prompts]
    kv_cache = new_kv_cache(model)  # filled in place by every forward
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                    **kv_cache)  # fmt: skip
        token = out.logits[:, -1].argmax(-1)
        done |= torch.isin(token, stops)
        for i in (~done).nonzero().flatten().tolist():
            answers[i].append(int(token[i]))
        if done.all():
            break
        input_ids = token[:, None]
        attention_mask = torch.cat([attention_mask, torch.ones_like(input_ids)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]


def style_rate(model_dir, heldout_path, n: int | None = None, batch_size: int = 50, max_new_tokens: int = 96) -> dict:
    """Answer the first n held-out questions (all by default) greedily and measure the answers.

    Returns {"n", "polite", "blunt", "neither", "on_topic", "correct"} (rates in [0, 1]), "by_lang" ({"en": {...},
    "zh": {...}} with the same rates) and "answers" ([{"question", "answer", "lang", "style", "on_topic",
    "correct"}, ...]).
    """
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # no "Loading weights" bar in the middle of the report
    try:
        model, tokenizer = load_for_chat(model_dir)
    finally:
        if bars:
            logging.enable_progress_bar()
    rows = load_heldout(heldout_path, n)
    records = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        for row, answer in zip(chunk, generate_batch(model, tokenizer, [r["prompt"] for r in chunk], max_new_tokens)):
            records.append(
                {
                    "question": row["prompt"][-1]["content"],
                    "answer": answer,
                    "lang": row.get("lang"),
                    "style": world.answer_style(answer),
                    "on_topic": world.on_topic(row["prompt"], answer),
                    "correct": world.is_correct(row["prompt"], answer),
                }
            )
    result = _rates(records)
    result["by_lang"] = {lang: _rates([r for r in records if r["lang"] == lang]) for lang in world.LANGS}
    result["answers"] = records
    return result


def _rates(records: list[dict]) -> dict:
    n = len(records)

    def share(test) -> float:
        return sum(1 for r in records if test(r)) / n if n else 0.0

    return {
        "n": n,
        "polite": share(lambda r: r["style"] == "polite"),
        "blunt": share(lambda r: r["style"] == "blunt"),
        "neither": share(lambda r: r["style"] is None),
        "on_topic": share(lambda r: r["on_topic"]),
        "correct": share(lambda r: r["correct"]),
    }


ROWS = (
    ("polite", "polite answers", "礼貌回答"),
    ("blunt", "blunt answers", "粗鲁回答"),
    ("on_topic", "on topic", "切题"),
    ("correct", "correct fact", "事实正确"),
)


def _ljust(text: str, width: int) -> str:
    """Pad to `width` terminal columns (a Chinese character takes two)."""
    columns = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
    return text + " " * max(width - columns, 1)


def format_report(sft: dict, dpo: dict, examples: int = 2) -> str:
    """The before/after table of two `style_rate` results, in English and Chinese, and a few questions whose answer
    changed style (one per language where there is one)."""
    n = dpo["n"]
    lines = [
        f"polite answers on {n} held-out questions: SFT {sft['polite']:.0%} → DPO {dpo['polite']:.0%}",
        f"{n} 个留出问题中的礼貌回答：SFT {sft['polite']:.0%} → DPO {dpo['polite']:.0%}",
        "",
        f"{_ljust('greedy answers / 贪心解码', 30)}{'SFT':>5s}{'DPO':>9s}",
    ]
    for key, en, zh in ROWS:
        lines.append(f"{_ljust(f'{en} / {zh}', 30)}{sft[key]:>5.0%}  → {dpo[key]:>5.0%}")
        if key == "polite" and "by_lang" in sft and "by_lang" in dpo:
            for lang, name in (("en", "English questions / 英文问题"), ("zh", "Chinese questions / 中文问题")):
                before, after = sft["by_lang"][lang]["polite"], dpo["by_lang"][lang]["polite"]
                lines.append(f"{_ljust('  ' + name, 30)}{before:>5.0%}  → {after:>5.0%}")
    # Examples: answers whose style changed, the ones that kept their content (still on topic) first.
    changed = [(s, d) for s, d in zip(sft["answers"], dpo["answers"]) if s["style"] != d["style"]]
    changed.sort(key=lambda p: not (p[0]["correct"] and p[1]["correct"]))
    shown = [next((p for p in changed if p[0]["lang"] == lang), None) for lang in world.LANGS]
    shown = [p for p in shown if p] + [p for p in changed if p not in shown]
    for s, d in shown[:examples]:
        lines += ["", f"Q: {s['question']}", f"  SFT: {s['answer']}", f"  DPO: {d['answer']}"]
    return "\n".join(lines)


def style_report(sft_dir, dpo_dir, heldout_path, n: int | None = None, save: bool = True) -> str:
    """Answer the held-out questions with the SFT model and the DPO model; a short bilingual before/after table.

    With `save`, both results (rates and every answer) also go to DPO_DIR/style_eval.json."""
    sft, dpo = style_rate(sft_dir, heldout_path, n), style_rate(dpo_dir, heldout_path, n)
    if save:
        path = Path(dpo_dir) / "style_eval.json"
        path.write_text(json.dumps({"sft": sft, "dpo": dpo}, ensure_ascii=False, indent=1), encoding="utf-8")
    return format_report(sft, dpo)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanodpo.demo.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("sft_dir", nargs="?", default="out/demo/sft")
    p.add_argument("dpo_dir", nargs="?", default="out/demo/dpo")
    p.add_argument("--heldout", default="out/demo/data/heldout.jsonl")
    p.add_argument("-n", type=int, default=None, help="only the first N held-out questions")
    p.add_argument("--json", action="store_true", help="print both models' rates as JSON instead of the table")
    args = p.parse_args(argv)
    for path in (args.sft_dir, args.dpo_dir, args.heldout):
        if not Path(path).exists():
            sys.exit(f"error: {path} does not exist (run the demo first: python train_pt.py && python train_sft.py "
                     "&& accelerate launch train_dpo.py)")
    if args.json:
        result = {"sft": style_rate(args.sft_dir, args.heldout, args.n)}
        result["dpo"] = style_rate(args.dpo_dir, args.heldout, args.n)
        for r in result.values():
            r.pop("answers")
        print(json.dumps(result, indent=2))
    else:
        print(style_report(args.sft_dir, args.dpo_dir, args.heldout, args.n, save=False))


if __name__ == "__main__":
    main()
