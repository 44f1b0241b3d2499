"""nanodpo.tools.chat: loading full models and LoRA adapters, greedy/sampled generation equal to HF's, one-shot answers,
--compare, and the interactive loop fed through stdin."""

import io
import json
import runpy
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, DynamicCache

from nanodpo.errors import UserError
from nanodpo.tools.chat import (
    Chat,
    adapter_base,
    generate_answer,
    generate_tokens,
    load_for_chat,
    main,
    new_kv_cache,
    render_prompt,
)
from tests import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

HELLO = [{"role": "user", "content": "Hello"}]


def make_adapter(base_dir, adapter_dir, seed=1):
    """A LoRA adapter on the tiny model, with lora_B perturbed so it really changes the outputs."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(adapter_dir)
    tiny.make_tokenizer(adapter_dir)
    return adapter_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    base = tiny.make_model_dir(root / "base", seed=0)
    adapter = make_adapter(base, root / "adapter")
    return SimpleNamespace(root=root, base=base, adapter=adapter)


@pytest.fixture(scope="module")
def base_model(dirs):
    return load_for_chat(dirs.base)


@pytest.fixture(scope="module")
def adapter_model(dirs):
    return load_for_chat(dirs.adapter)


def test_greedy_equals_hf_generate(base_model):
    model, tokenizer = base_model
    ids = generate_tokens(model, tokenizer, HELLO, max_new_tokens=12)
    prompt = tokenizer(render_prompt(tokenizer, HELLO), add_special_tokens=False, return_tensors="pt").input_ids
    assert tokenizer.decode(prompt[0]).endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    expected = model.generate(
        prompt, do_sample=False, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id, pad_token_id=0
    )[0, prompt.shape[1] :].tolist()
    if expected and expected[-1] == tokenizer.eos_token_id:
        expected = expected[:-1]
    assert ids == expected and len(ids) > 0
    assert generate_answer(model, tokenizer, HELLO, 12) == tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_kv_cache_goes_under_the_name_the_forward_takes(base_model, adapter_model):
    """transformers 5.24 renamed forward's `past_key_values` to `cache` and warns on the old name at every call: the
    cache is made once and passed under whichever name the model's forward has (also through a peft wrapper)."""
    for model, _ in (base_model, adapter_model):
        ((name, cache),) = new_kv_cache(model).items()
        assert name == "past_key_values"  # transformers 5.23, the version pinned by the test extra
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 0

    class RenamedForward(torch.nn.Module):  # the 5.24 signature
        config = base_model[0].config

        def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None):
            raise AssertionError("not called")

    assert list(new_kv_cache(RenamedForward())) == ["cache"]


def test_stops_at_eos(base_model):
    model, tokenizer = base_model
    ids = generate_tokens(model, tokenizer, HELLO, max_new_tokens=12)
    cut = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # a token first produced at position `cut`
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, ids[cut]]
        assert generate_tokens(model, tokenizer, HELLO, max_new_tokens=12) == ids[:cut]
    finally:
        model.generation_config.eos_token_id = saved


def test_sampling_is_seeded_and_top_p_narrows(base_model):
    model, tokenizer = base_model
    sample = lambda seed, **kw: generate_tokens(model, tokenizer, HELLO, 16, seed=seed, **kw)  # noqa: E731
    a = sample(0, temperature=1.0)
    assert a == sample(0, temperature=1.0)
    assert a != sample(1, temperature=1.0)
    # A nucleus this small holds only the most likely token: sampling becomes greedy whatever the temperature.
    assert sample(3, temperature=5.0, top_p=1e-6) == generate_tokens(model, tokenizer, HELLO, 16)


def test_adapter_is_loaded_on_its_base(dirs, base_model, adapter_model):
    model, tokenizer = adapter_model
    assert isinstance(model, PeftModel) and not model.training
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs.base), dirs.adapter).eval()
    x = tokenizer("Hello there, 你好", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(x).logits
        torch.testing.assert_close(logits, reference(x).logits, rtol=0, atol=1e-6)
        assert (logits - base_model[0](x).logits).abs().max() > 1e-2  # the adapter changes the model


def test_base_override_and_user_errors(dirs, tmp_path):
    moved = tmp_path / "adapter"
    shutil.copytree(dirs.adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "base")  # trained elsewhere
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not exist here: pass --base"):
        load_for_chat(moved)
    model, _ = load_for_chat(moved, base=str(dirs.base))
    assert isinstance(model, PeftModel)
    assert adapter_base(moved, str(dirs.base)) == str(dirs.base)

    with pytest.raises(UserError, match="no such folder"):
        load_for_chat(tmp_path / "missing" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a model"):
        load_for_chat(tmp_path / "empty")
    with pytest.raises(UserError, match="no adapter_config.json"):
        adapter_base(tmp_path / "empty")
    tokenizer = tiny.make_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        render_prompt(tokenizer, HELLO)
    with pytest.raises(UserError, match="--top_p"):
        main(["--model", str(dirs.base), "--top_p", "0"])


def test_prompt_and_compare(dirs, base_model, adapter_model):
    adapter_model, tokenizer = adapter_model
    answer = lambda model, q: generate_answer(model, tokenizer, [{"role": "user", "content": q}], 8)  # noqa: E731

    out = io.StringIO()
    main(["--model", str(dirs.base), "--prompt", "Hello", "--max_new_tokens", "8"], out=out)
    assert out.getvalue() == answer(base_model[0], "Hello") + "\n"

    out = io.StringIO()
    argv = ["--model", str(dirs.adapter), "--compare", str(dirs.base), "--max_new_tokens", "8"]
    main(argv + ["--prompt", "Hello", "--prompt", "你好"], out=out)
    expected = "".join(
        f">>> {q}\n[{dirs.adapter}]\n{answer(adapter_model, q)}\n[{dirs.base}]\n{answer(base_model[0], q)}\n\n"
        for q in ("Hello", "你好")
    )
    assert out.getvalue() == expected
    assert answer(adapter_model, "Hello") != answer(base_model[0], "Hello")


def test_repl_system_prompt_history_and_clear(dirs, base_model):
    model, tokenizer = base_model
    stdin = io.StringIO(
        "/system Be brief.\nHello\nMore please\n/system\n/clear\nHello\n/system -\nHello\n/quit\nnot read\n"
    )
    out = io.StringIO()
    main(["--model", str(dirs.base), "--max_new_tokens", "6", "--system", "Be kind."], stdin=stdin, out=out)
    text = out.getvalue()

    system = {"role": "system", "content": "Be brief."}
    a1 = generate_answer(model, tokenizer, [system, *HELLO], 6)
    history = [system, *HELLO, {"role": "assistant", "content": a1}, {"role": "user", "content": "More please"}]
    a2 = generate_answer(model, tokenizer, history, 6)
    a3 = generate_answer(model, tokenizer, HELLO, 6)  # no system prompt
    assert text.startswith(f"chatting with {dirs.base}.")
    assert "system: Be kind.\n" in text and "system: Be brief. (new conversation)\n" in text
    expected_tail = (
        f"user> {a1}\nuser> {a2}\nuser> system: Be brief.\nuser> (new conversation)\nuser> {a1}\n"
        f"user> system: (none) (new conversation)\nuser> {a3}\nuser> "
    )
    assert text.endswith(expected_tail)


def test_long_conversation_drops_oldest_turns(base_model):
    model, tokenizer = base_model
    chat = Chat("m", model, tokenizer, SimpleNamespace(system="sys", max_new_tokens=200))
    long = "The quick brown fox jumps over the lazy dog. " * 4
    for i in range(6):
        chat.turns += [{"role": "user", "content": f"{i} {long}"}, {"role": "assistant", "content": long}]
    messages = chat.fit("last question")
    n_tokens = len(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False).input_ids)
    assert n_tokens + 200 <= model.config.max_position_embeddings
    assert messages[0] == {"role": "system", "content": "sys"} and messages[-1]["content"] == "last question"
    kept = len(chat.turns) // 2
    assert 0 < kept < 6 and messages[1:-1] == chat.turns  # the newest exchanges are kept, oldest first
    assert [m["content"][0] for m in chat.turns[::2]] == [str(i) for i in range(6 - kept, 6)]


@pytest.mark.filterwarnings("ignore:'nanodpo.tools.chat' found in sys.modules")
def test_command_line_entry_point(dirs, base_model, monkeypatch, capsys):
    """`python -m nanodpo.tools.chat` as a user runs it (the module run as __main__), its REPL fed through stdin."""
    model, tokenizer = base_model
    monkeypatch.setattr(sys, "argv", ["nanodpo.tools.chat", "--model", str(dirs.base), "--max_new_tokens", "6"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("/system Be brief.\nHello\n"))
    runpy.run_module("nanodpo.tools.chat", run_name="__main__")
    a1 = generate_answer(model, tokenizer, [{"role": "system", "content": "Be brief."}, *HELLO], 6)
    assert capsys.readouterr().out.endswith(f"user> system: Be brief. (new conversation)\nuser> {a1}\nuser> \n")

    # A user error: one line on stderr, exit status 2, no traceback.
    monkeypatch.setattr(sys, "argv", ["nanodpo.tools.chat", "--model", str(dirs.root / "missing" / "x")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("nanodpo.tools.chat", run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such folder" in err
