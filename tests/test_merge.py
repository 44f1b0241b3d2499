"""nanodpo.tools.merge: the merged model is a plain HF model whose logits equal the PeftModel's."""

import json
import runpy
import shutil
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanodpo.errors import UserError
from nanodpo.tools.chat import generate_answer, load_for_chat
from nanodpo.tools.merge import main, merge_adapter
from tests import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = tiny.make_model_dir(root / "base", seed=0, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero (a no-op adapter): make it a real update
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(root / "adapter")
    tiny.make_tokenizer(root / "adapter")
    return root


def logits(model, tokenizer, text="Hello there, 你好！ What is DPO?"):
    with torch.no_grad():
        return model(tokenizer(text, return_tensors="pt").input_ids).logits


def test_merged_logits_equal_peft_model(dirs):
    out = merge_adapter(dirs / "adapter", dirs / "merged")
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "adapter_config.json" not in files and "adapter_model.safetensors" not in files
    assert json.loads((out / "merged_from.json").read_text())["dtype"] == "float32"

    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not isinstance(merged, PeftModel) and merged.dtype == torch.float32
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(dirs / "base")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs / "base"), dirs / "adapter")
    expected = logits(reference.eval(), tokenizer)
    torch.testing.assert_close(logits(merged.eval(), tokenizer), expected, rtol=0, atol=1e-5)
    assert (expected - logits(base.eval(), tokenizer)).abs().max() > 1e-2  # the adapter does change the model

    # nanodpo.tools.chat treats the merged folder as a plain model and answers like the adapter does.
    hello = [{"role": "user", "content": "Hello"}]
    merged_answer = generate_answer(*load_for_chat(out), hello, max_new_tokens=8)
    assert merged_answer == generate_answer(*load_for_chat(dirs / "adapter"), hello, max_new_tokens=8)


def test_cli_dtype_and_base_override(dirs, capsys):
    moved = dirs / "moved_adapter"
    shutil.copytree(dirs / "adapter", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(dirs / "elsewhere")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="pass --base"):
        main(["--adapter", str(moved), "--out", str(dirs / "bf16")])

    main(["--adapter", str(moved), "--out", str(dirs / "bf16"), "--base", str(dirs / "base"), "--dtype", "bfloat16"])
    assert "merged" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(dirs / "bf16", dtype="auto")
    assert merged.dtype == torch.bfloat16
    float_merged = AutoModelForCausalLM.from_pretrained(dirs / "merged")  # from the test above
    for (name, p), (_, q) in zip(merged.named_parameters(), float_merged.named_parameters()):
        torch.testing.assert_close(p, q.to(torch.bfloat16), msg=name)  # merged in fp32, then rounded once


@pytest.mark.filterwarnings("ignore:'nanodpo.tools.merge' found in sys.modules")
def test_user_errors(dirs, tmp_path, monkeypatch, capsys):
    (tmp_path / "not_adapter").mkdir()
    (tmp_path / "not_adapter" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no adapter_config.json"):
        merge_adapter(tmp_path / "not_adapter", tmp_path / "out")
    with pytest.raises(UserError, match="no such folder"):
        merge_adapter(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(UserError, match="is the adapter folder"):
        merge_adapter(dirs / "adapter", dirs / "adapter")
    with pytest.raises(UserError, match="holds a LoRA adapter"):
        merge_adapter(dirs / "adapter", dirs / "moved_adapter")

    monkeypatch.setattr(sys, "argv", ["nanodpo.tools.merge", "--adapter", str(tmp_path / "missing"), "--out", "x"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("nanodpo.tools.merge", run_name="__main__")
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: --adapter")
