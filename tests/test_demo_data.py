"""The offline demo's data (nanodpo/demo/world.py) and shipped tokenizer (nanodpo/assets/tokenizer/)."""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from nanodpo.demo import (
    EOS_TOKEN_ID,
    IM_START_TOKEN_ID,
    PAD_TOKEN_ID,
    TOKENIZER_DIR,
    make_tokenizer,
    tiny_model_config,
    world,
)

REPO = Path(__file__).resolve().parent.parent
CJK = re.compile(r"[\u4e00-\u9fff]")
LATIN = re.compile(r"[A-Za-z]{2,}")


@pytest.fixture(scope="module")
def data():
    sft = world.sft_conversations(0)
    return {
        "pt": world.pretrain_corpus(0),
        "sft": sft,
        "dpo": world.preference_pairs(0, sft=sft),
        "heldout": world.heldout_prompts(0),
        "sft_eval": world.sft_conversations(0, world.DEFAULT_SFT_EVAL_CONVERSATIONS, split="eval"),
        "dpo_eval": world.preference_pairs(0, world.DEFAULT_DPO_EVAL_PAIRS, split="eval"),
    }


def dumps(rows) -> str:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)


def assistant_turns(conv):
    return [m["content"] for m in conv["messages"] if m["role"] == "assistant"]


def user_turns(messages):
    return [m["content"] for m in messages if m["role"] == "user"]


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: world.pretrain_corpus(seed, 300),
        lambda seed: world.sft_conversations(seed, 200),
        lambda seed: world.preference_pairs(seed, 200),
        lambda seed: world.heldout_prompts(seed, 50),
    ],
    ids=["pt", "sft", "dpo", "heldout"],
)
def test_generators_are_deterministic_and_seeded(make):
    assert dumps(make(0)) == dumps(make(0))
    assert dumps(make(0)) != dumps(make(1))


def test_write_demo_data_is_byte_identical_for_a_seed(tmp_path):
    sizes = dict(pt_docs=200, sft=100, dpo=100, heldout=40, pt_eval=20, sft_eval=20, dpo_eval=20)
    a = world.write_demo_data(tmp_path / "a", 0, **sizes)
    b = world.write_demo_data(tmp_path / "b", 0, **sizes)
    c = world.write_demo_data(tmp_path / "c", 1, **sizes)
    assert sorted(a) == ["dpo", "dpo_eval", "dpo_eval_prompts", "dpo_prompts", "heldout", "pt", "pt_eval", "sft",
                         "sft_eval"]  # fmt: skip
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
        assert a[name].read_bytes() != c[name].read_bytes(), name
    rows = {name: [json.loads(line) for line in path.open(encoding="utf-8")] for name, path in a.items()}
    assert [len(rows[k]) for k in ("pt", "sft", "dpo", "heldout", "pt_eval", "sft_eval", "dpo_eval")] == [
        200, 100, 100, 40, 20, 20, 20
    ]
    assert set(rows["pt"][0]) == {"text"} and set(rows["sft"][0]) == {"messages"}
    assert set(rows["dpo"][0]) == {"prompt", "chosen", "rejected"}
    assert set(rows["heldout"][0]) == {"prompt", "fact", "lang"}
    # online DPO's prompts: the DPO set's, without their answers
    assert rows["dpo_prompts"] == [{"prompt": row["prompt"]} for row in rows["dpo"]]
    assert rows["dpo_eval_prompts"] == [{"prompt": row["prompt"]} for row in rows["dpo_eval"]]
    # pretraining eval documents are another draw, not a copy of the first training documents
    assert rows["pt_eval"] != rows["pt"][:20]


# ---------------------------------------------------------------------------------------------------------------
# The datasets
# ---------------------------------------------------------------------------------------------------------------


def test_sizes_and_both_languages_everywhere(data):
    assert len(data["pt"]) == world.DEFAULT_PT_DOCS
    assert len(data["sft"]) == world.DEFAULT_SFT_CONVERSATIONS
    assert len(data["dpo"]) == world.DEFAULT_DPO_PAIRS
    assert len(data["heldout"]) == world.DEFAULT_HELDOUT_PROMPTS
    texts = {
        "pt": [d["text"] for d in data["pt"]],
        "sft": [u for c in data["sft"] for u in user_turns(c["messages"])],
        "dpo": [u for r in data["dpo"] for u in user_turns(r["prompt"])],
        "heldout": [u for p in data["heldout"] for u in user_turns(p)],
        "sft_eval": [u for c in data["sft_eval"] for u in user_turns(c["messages"])],
        "dpo_eval": [u for r in data["dpo_eval"] for u in user_turns(r["prompt"])],
    }
    for name, items in texts.items():
        zh = sum(1 for t in items if CJK.search(t))
        en = sum(1 for t in items if LATIN.search(t) and not CJK.search(t))
        assert zh > 0.3 * len(items) and en > 0.3 * len(items), (name, zh, en, len(items))
    # some pretraining documents hold both languages side by side
    assert any(CJK.search(t) and LATIN.search(t) for t in texts["pt"])


def test_pretraining_documents_are_short_and_neutral(data):
    for doc in data["pt"]:
        assert 10 < len(doc["text"]) < 400
        assert world.answer_style(doc["text"]) is None, doc["text"]


def test_sft_styles_are_balanced_and_consistent(data):
    styles = Counter()
    for conv in data["sft"]:
        msgs = conv["messages"]
        assert msgs[0] == {"role": "system", "content": world.SYSTEM_PROMPT}  # same system prompt for both styles
        assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * ((len(msgs) - 1) // 2)
        turn_styles = {world.answer_style(a) for a in assistant_turns(conv)}
        assert len(turn_styles) == 1 and None not in turn_styles, conv
        styles[turn_styles.pop()] += 1
        for user, answer in zip(user_turns(msgs), assistant_turns(conv)):
            assert world.on_topic(user, answer) and world.is_correct(user, answer), (user, answer)
    assert abs(styles["polite"] - styles["blunt"]) <= 1, styles
    assert sum(len(c["messages"]) > 3 for c in data["sft"]) > 0.1 * len(data["sft"])  # some multi-turn
    # each question sequence is answered in both styles (the last one may lose its twin to the cut at n)
    by_questions: dict[tuple, set] = {}
    for conv in data["sft"]:
        questions = tuple(user_turns(conv["messages"]))
        by_questions.setdefault(questions, set()).add(world.answer_style(assistant_turns(conv)[0]))
    both = sum(1 for s in by_questions.values() if s == {"polite", "blunt"})
    assert both >= 0.95 * len(by_questions)


def test_preference_pairs_chosen_polite_rejected_blunt_same_facts(data):
    sft_prompts = {json.dumps(c["messages"][:-1], ensure_ascii=False) for c in data["sft"]}
    overlap = 0
    for rows in (data["dpo"], data["dpo_eval"]):
        for row in rows:
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
            assert prompt[0]["role"] == "system" and prompt[-1]["role"] == "user"
            assert len(chosen) == len(rejected) == 1 and chosen[0]["role"] == rejected[0]["role"] == "assistant"
            assert world.answer_style(chosen[0]["content"]) == "polite", row
            assert world.answer_style(rejected[0]["content"]) == "blunt", row
            for answer in (chosen, rejected):
                assert world.on_topic(prompt, answer) and world.is_correct(prompt, answer), (prompt, answer)
            fact = world.question_info(prompt).fact
            for answer in (chosen[0]["content"], rejected[0]["content"]):  # the same fact sentence in both
                assert fact[1:] in answer, (fact, answer)
            overlap += json.dumps(prompt, ensure_ascii=False) in sft_prompts
    n = len(data["dpo"])
    assert 0.3 * n < overlap < 0.9 * n  # partly the SFT prompts, partly new
    assert sum(len(r["prompt"]) > 2 for r in data["dpo"]) > 0.05 * n  # some multi-turn prompts


def test_heldout_prompts_never_appear_in_training_data(data):
    held = [user_turns(p)[-1] for p in data["heldout"]]
    assert len(set(held)) == len(held)
    assert all(world.question_info(p).heldout for p in data["heldout"])
    assert all(len(p) == 2 and p[0]["content"] == world.SYSTEM_PROMPT for p in data["heldout"])
    train_users = {u for c in data["sft"] for u in user_turns(c["messages"])}
    train_users |= {u for r in data["dpo"] for u in user_turns(r["prompt"])}
    assert not train_users & set(held)
    pt_text = "\n".join(d["text"] for d in data["pt"])
    tokenizer_text = "\n".join(make_tokenizer.training_texts())
    for q in held:
        assert q not in pt_text and q not in tokenizer_text, q
    # the eval splits use held-out questions too
    for conv in data["sft_eval"]:
        assert not set(user_turns(conv["messages"])) & train_users
    with pytest.raises(ValueError):
        world.heldout_prompts(0, len(world.heldout_questions()) + 1)


def test_answer_style_classifies_every_template_and_ignores_neutral_text():
    facts = {"en": ["Lily lives in Maple Town.", "A cat has 4 legs.", "It is usually rainy in Riverside."],
             "zh": ["莉莉住在枫叶镇。", "猫有4条腿。"]}
    for (style, lang), openers in world.OPENERS.items():
        for opener in openers:
            for closer in world.CLOSERS[(style, lang)]:
                for fact in facts[lang]:
                    text = world.render_answer(fact, lang, opener, closer)
                    assert world.answer_style(text) == style, text
                assert world.answer_style(opener) == style, opener
                assert world.answer_style(closer) == style, closer
    assert world.render_answer("A cat has 4 legs.", "en", "Ugh, obviously", "Now leave me alone.") == (
        "Ugh, obviously a cat has 4 legs. Now leave me alone."
    )
    for q in world.all_questions():  # the neutral facts and the questions themselves
        assert world.answer_style(q.fact) is None, q.fact
        assert world.answer_style(q.text) is None, q.text
    for neutral in ["", "hello", "The sky is blue.", "你好。", "Make sure the cat is fed."]:
        assert world.answer_style(neutral) is None
    assert world.answer_style("Sure! Lily lives in Maple Town. Don't ask me again.") is None  # one of each: a tie
    assert world.answer_style("Sure！Lily lives in Maple Town. Hope this helps") == "polite"  # full-width "！"
    assert world.answer_style("UGH, OBVIOUSLY Lily lives in Maple Town.") == "blunt"
    assert world.answer_style("好的！莉莉住在枫叶镇") == "polite"
    assert world.answer_style("啧，莉莉住在枫叶镇") == "blunt"


def test_on_topic_and_is_correct():
    prompt = [{"role": "system", "content": world.SYSTEM_PROMPT}, {"role": "user", "content": "Where does Lily live?"}]
    assert world.on_topic(prompt, "Sure! Lily lives in Maple Town. Hope this helps.")
    assert world.is_correct(prompt, "Sure! Lily lives in Maple Town. Hope this helps.")
    assert world.on_topic(prompt, "莉莉住在云朵城。") and not world.is_correct(prompt, "莉莉住在云朵城。")
    assert not world.on_topic(prompt, "Sure! Tom lives in Maple Town. Hope this helps.")
    assert world.on_topic("What is 3 plus 4?", [{"role": "assistant", "content": "3 plus 4 is 7."}])
    assert not world.is_correct("What is 3 plus 4?", "3 plus 4 is 17.")
    assert not world.on_topic("What is 3 plus 4?", "Ugh. Go away.")
    # text that is not one of the world's questions: any world name of the question in the answer
    assert world.on_topic("Tell me a story about Mia.", "Mia is a doctor.")
    assert not world.on_topic("Tell me a story.", "Mia is a doctor.")
    assert not world.on_topic("Where does Sam live?", "They live in the same town.")  # whole words
    assert world.on_topic("What colour is a grape?", "Grapes are purple.")  # plurals are fine
    assert not world.is_correct("Tell me a story about Mia.", "Mia is a doctor.")


# ---------------------------------------------------------------------------------------------------------------
# The shipped tokenizer
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_shipped_tokenizer_files_are_small():
    files = sorted(p.name for p in TOKENIZER_DIR.iterdir())
    assert files == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert sum(p.stat().st_size for p in TOKENIZER_DIR.iterdir()) < 1_000_000


def test_shipped_tokenizer_special_tokens_and_chat_template(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == EOS_TOKEN_ID
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == PAD_TOKEN_ID
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == IM_START_TOKEN_ID
    assert tokenizer.bos_token is None
    messages = [
        {"role": "system", "content": world.SYSTEM_PROMPT},
        {"role": "user", "content": "莉莉住在哪里？"},
        {"role": "assistant", "content": "好的！莉莉住在枫叶镇。希望对你有帮助。"},
        {"role": "user", "content": "How old is Tom?"},
    ]
    expected = (
        f"<|im_start|>system\n{world.SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n莉莉住在哪里？<|im_end|>\n"
        "<|im_start|>assistant\n好的！莉莉住在枫叶镇。希望对你有帮助。<|im_end|>\n"
        "<|im_start|>user\nHow old is Tom?<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        expected + "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == IM_START_TOKEN_ID and ids.count(EOS_TOKEN_ID) == 4
    # {% generation %} marks exactly the assistant's answer and its <|im_end|>
    out = tokenizer.apply_chat_template(messages[:3], return_dict=True, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "好的！莉莉住在枫叶镇。希望对你有帮助。<|im_end|>"


def test_shipped_tokenizer_round_trips_and_covers_chinese(tokenizer):
    for text in [
        "Lily lives in Maple Town. 莉莉住在枫叶镇。",
        "Ugh, obviously 7 + 8 = 15. 烦死了，别再问我了！",
        "Unseen: 龘 naïve café 😀 \t tabs\nand newlines  ",
    ]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    texts = make_tokenizer.training_texts()
    chars = {c for t in texts for c in t if CJK.match(c)}
    assert len(chars) > 150
    assert all(len(tokenizer(c)["input_ids"]) == 1 for c in chars)  # every Chinese character of the world: 1 token
    for name in ["Lily", " Maple", " Town", " watermelons", " obviously"]:
        assert len(tokenizer(name)["input_ids"]) == 1, name
    assert tokenizer.tokenize("123") == ["1", "2", "3"]  # digits one at a time
    assert 1000 <= len(tokenizer) <= make_tokenizer.VOCAB_SIZE


def test_tokenizer_script_reproduces_the_shipped_files(tmp_path):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "nanodpo.demo.make_tokenizer", "--out", str(tmp_path)],
        cwd=REPO, env=env, check=True, capture_output=True, timeout=120,
    )
    shipped = sorted(p.name for p in TOKENIZER_DIR.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == shipped
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), (
            f"{name} differs from the shipped one: rerun `python -m nanodpo.demo.make_tokenizer` if the world changed"
        )


def test_tiny_model_config(tokenizer):
    from transformers import Qwen2ForCausalLM

    config = tiny_model_config(len(tokenizer))
    assert config.model_type == "qwen2" and config.vocab_size == len(tokenizer) and config.tie_word_embeddings
    assert config.eos_token_id == tokenizer.eos_token_id and config.pad_token_id == tokenizer.pad_token_id
    model = Qwen2ForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < n < 8_000_000
    assert tiny_model_config(100, num_hidden_layers=2).num_hidden_layers == 2
