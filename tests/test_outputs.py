"""What a run leaves behind, and what installing nanodpo gives: a chat model that stops at the end of its turn (EOS
aligned with the chat template), a model card in every output folder, and a package that says what it lacks."""

from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import train_sft
from nanodpo.config import DPOConfig, PTConfig, parse_config
from nanodpo.errors import UserError
from nanodpo.model import check_model_options
from nanodpo.scale.model_card import model_card
from nanodpo.tools.plot import plot_metrics
from nanodpo.tracking import check_trackers, read_metrics
from tests import tiny

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
ROOT = Path(__file__).resolve().parents[1]
ANSWER = "Paris is the capital of France."


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A base model as Qwen2.5's ships: ChatML tokens in the vocabulary, but EOS <|endoftext|> (and no template)."""
    root = tmp_path_factory.mktemp("outputs")
    tokenizer = tiny.make_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.chat_template = None
    model = tiny.make_model(tokenizer, seed=1)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": ANSWER}]}  # fmt: skip
    tiny.write_jsonl(root / "chats.jsonl", [chat] * 8)
    tiny.write_jsonl(root / "text.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}] * 8)
    return root


def sft(base: Path, out: Path, *extra: str, data: str = "chats.jsonl") -> None:
    train_sft.main(["--model", str(base / "base"), "--dataset", str(base / data), "--output_dir", str(out),
                    "--chat_template", "chatml", "--max_steps", "30", "--learning_rate", "1e-2",
                    "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "4", "--max_length", "64",
                    "--disable_tqdm", "--logging_steps", "10", *extra])  # fmt: skip


def greedy(model, tokenizer, max_new_tokens: int = 40, **kwargs) -> list[int]:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, ids.shape[1] :].tolist()


def test_sft_of_a_base_model_saves_the_end_of_turn_token_as_eos(base, tmp_path, capsys, monkeypatch):
    """SFT with --chat_template chatml on a base whose EOS is <|endoftext|>: the saved tokenizer, config.json and
    generation_config say <|im_end|>, and generate() stops right after the answer it learned."""
    from nanodpo import errors

    monkeypatch.setattr(errors, "_said_once", set())  # the notice is printed once per process
    out = tmp_path / "sft"
    sft(base, out, "--save_steps", "20")
    assert "ends a turn with <|im_end|>, the tokenizer's EOS is <|endoftext|>" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tokenizer.eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(out).eos_token_id == [im_end, endoftext]  # the base's EOS stays one too
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.eos_token_id == im_end
    generated = greedy(model, tokenizer)
    assert tokenizer.decode(generated) == ANSWER + "<|im_end|>"  # stopped at the end of its turn
    # The base's generation settings alone (EOS <|endoftext|>) would not have stopped there.
    assert len(greedy(model, tokenizer, eos_token_id=endoftext)) > len(generated)

    # The model card, in the output folder and in the checkpoint: what the hub reads, and the last logged metrics.
    records = read_metrics(out / "metrics.jsonl")
    for folder, step in [(out, 30), (out / "checkpoint-20", 20)]:
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "transformers" and card.data.tags == ["nanodpo", "sft"]
        assert card.data.base_model is None  # a local folder: nothing the hub could link to
        record = next(r for r in records if r["step"] == step)
        assert f"Training, at step {step}" in card.text and f"| loss | {record['loss']:.4g} |" in card.text
    assert "# sft/checkpoint-20" in (out / "checkpoint-20" / "README.md").read_text()


def test_lora_sft_keeps_the_eos_with_the_adapter_and_the_merge(base, tmp_path):
    from nanodpo.tools.merge import merge_adapter

    out = tmp_path / "lora"
    sft(base, out, "--use_lora", "--lora_r", "4", "--max_steps", "2")
    card = ModelCard.load(out / "README.md").data
    assert card.library_name == "peft" and card.tags == ["nanodpo", "sft", "lora"]  # not peft's own card
    im_end = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>")
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(out).eos_token_id[0] == im_end
    merged = merge_adapter(out, tmp_path / "merged")
    assert GenerationConfig.from_pretrained(merged).eos_token_id[0] == im_end
    assert AutoModelForCausalLM.from_pretrained(merged).config.eos_token_id == im_end


def test_text_sft_keeps_the_eos_and_eos_token_chooses_one(base, tmp_path):
    """Text rows never teach the end-of-turn token: the EOS stays. --eos_token (TRL's) is appended to text rows and
    saved; a token the tokenizer lacks is refused."""
    out = tmp_path / "text"
    sft(base, out, "--max_steps", "1", data="text.jsonl")
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"

    from nanodpo.config import SFTConfig, parse_config
    from nanodpo.model import load_tokenizer
    from nanodpo.sft_data import load_sft_data, set_eos_token

    cfg = parse_config(SFTConfig, ["--model", str(base / "base"), "--dataset", str(base / "text.jsonl")])
    tokenizer = load_tokenizer(cfg)
    set_eos_token(tokenizer, "<|im_end|>")
    assert load_sft_data(cfg, tokenizer)[0].input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = tmp_path / "chosen"
    sft(base, out, "--max_steps", "1", "--eos_token", "<|im_end|>", data="text.jsonl")
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"
    assert AutoModelForCausalLM.from_pretrained(out).generation_config.eos_token_id[0] == tokenizer.eos_token_id
    with pytest.raises(UserError, match="--eos_token '<eot>': not a token of this tokenizer"):
        sft(base, tmp_path / "bad", "--eos_token", "<eot>")


def test_model_card_names_hub_models_and_data_and_the_method(base, tmp_path):
    out = tmp_path / "dpo"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 5, "loss": 0.61, "rewards/accuracies": 0.75}\n'
                                       '{"step": 5, "eval_loss": 0.65, "eval_rewards/margins": 0.125}\n')  # fmt: skip
    cfg = parse_config(DPOConfig, ["--model", "Qwen/Qwen2.5-0.5B-Instruct", "--dataset",
                                   "trl-lib/ultrafeedback_binarized", str(base / "chats.jsonl"), "--output_dir",
                                   str(out), "--beta", "0.2", "--use_lora"])  # fmt: skip
    card_file = tmp_path / "README.md"
    card_file.write_text(model_card(cfg, "dpo", adapter=True, processes=2))
    card = ModelCard.load(card_file)
    assert card.data.to_dict() == {
        "library_name": "peft", "base_model": "Qwen/Qwen2.5-0.5B-Instruct", "tags": ["nanodpo", "dpo", "lora"],
        "datasets": ["trl-lib/ultrafeedback_binarized"], "pipeline_tag": "text-generation",
    }  # fmt: skip
    for line in ["| beta | 0.2 |", "| loss_type | sigmoid |", "| lora_r | 16 |", "| processes (global batch) | 2 (8) |",
                 "| rewards/accuracies | 0.75 |", "Evaluation, at step 5", "| eval_rewards/margins | 0.125 |",
                 str(base / "chats.jsonl"), "Direct Preference Optimization", "AutoPeftModelForCausalLM"]:  # fmt: skip
        assert line in card.text, line
    # A local base model with a card of its own passes its license on; a model from scratch has no base model.
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a base model\n")
    cfg = parse_config(DPOConfig, ["--model", str(tmp_path / "local"), "--output_dir", str(out)])
    assert ModelCard(model_card(cfg, "dpo", adapter=False)).data.license == "apache-2.0"
    cfg = parse_config(PTConfig, ["--model", "nanodpo-tiny", "--from_scratch", "--output_dir", str(out)])
    card = ModelCard(model_card(cfg, "pt", adapter=False))
    assert card.data.base_model is None and "trained from scratch" in card.text


# ---------------------------------------------------------------- installing: optional extras, the package alone

OPTIONAL = ["wandb", "tensorboard", "bitsandbytes", "matplotlib"]  # pyproject.toml's extras, by module


@pytest.mark.parametrize("module, extra, refused", [
    ("wandb", "wandb", lambda: check_trackers(parse_config(DPOConfig, ["--report_to", "wandb"]), {})),
    ("tensorboard", "tensorboard", lambda: check_trackers(parse_config(DPOConfig, ["--report_to", "tensorboard"]), {})),
    ("bitsandbytes", "qlora", lambda: check_model_options(parse_config(
        DPOConfig, ["--model", "Qwen/Qwen2.5-0.5B", "--load_in_4bit", "--use_lora"]))),
    ("matplotlib", "plot", lambda: plot_metrics([{"step": 1, "loss": 0.5}], "unused")),
])  # fmt: skip
def test_a_flag_that_needs_a_missing_extra_names_it(module, extra, refused, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: `import` fails, find_spec says None
    expected = rf'needs the {module} package, which is not installed: pip install -e "\.\[{extra}\]"'
    with pytest.raises(UserError, match=expected):
        refused()


WITHOUT_EXTRAS = """
import sys
for name in {optional}:
    sys.modules[name] = None  # as if not installed: `import` fails, importlib.util.find_spec says None
sys.path.insert(0, {root!r})
import train_dpo, train_sft
train_sft.main({sft})
train_dpo.main({dpo})
assert not [name for name in {optional} if sys.modules.get(name) is not None]
print("trained without the extras")
"""


def test_the_training_loops_need_no_extra(base, tmp_path):
    """SFT with LoRA and DPO run end to end with wandb, tensorboard, bitsandbytes and matplotlib unimportable."""
    import subprocess
    import sys

    tiny.write_jsonl(tmp_path / "pairs.jsonl", tiny.preference_rows(4))
    common = ["--model", str(base / "base"), "--max_steps", "1", "--per_device_train_batch_size", "2",
              "--disable_tqdm", "--chat_template", "chatml"]  # fmt: skip
    sft = [*common, "--dataset", str(base / "chats.jsonl"), "--output_dir", str(tmp_path / "sft"), "--use_lora"]
    dpo = [*common, "--dataset", str(tmp_path / "pairs.jsonl"), "--output_dir", str(tmp_path / "dpo")]
    code = WITHOUT_EXTRAS.format(optional=OPTIONAL, root=str(ROOT), sft=sft, dpo=dpo)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "trained without the extras" in result.stdout, result.stderr[-3000:]


def test_the_wheel_holds_the_package_and_says_what_it_lacks(tmp_path):
    """`pip install .` gives the nanodpo package only (not the scripts or configs, which live in the clone), with the
    optional packages as extras; what needs the clone says so instead of failing on a missing file."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # built from a copy: a build in the repository would leave build/ there
    shutil.copytree(ROOT / "nanodpo", source / "nanodpo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w", str(tmp_path / "wheel")]
    build = subprocess.run([sys.executable, "-m", *pip_wheel], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = (tmp_path / "wheel").glob("nanodpo-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        archive.extractall(tmp_path / "site")
    assert {name.split("/")[0] for name in names} == {"nanodpo", wheel.name.split("-py")[0] + ".dist-info"}
    assert "nanodpo/assets/tokenizer/tokenizer.json" in names and "nanodpo/tools/chat.py" in names
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [line for line in requires if "extra ==" not in line]
    for package, extra in [("wandb", "wandb"), ("tensorboard", "tensorboard"), ("bitsandbytes", "qlora"),
                           ("matplotlib", "plot")]:  # fmt: skip
        assert not [line for line in core if package in line], (package, core)
        assert any(line.startswith(f"Requires-Dist: {package}>=") and f'extra == "{extra}"' in line
                   for line in requires), (package, requires)  # fmt: skip
    assert f"Requires-Dist: nanodpo[{','.join(sorted(['wandb', 'tensorboard', 'qlora', 'plot']))}]; extra == " \
        '"test"' in requires  # the test extra installs them all  # fmt: skip

    # The installed package alone: the library imports; the demo and the bench name the clone they need.
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")}
    check = "import nanodpo, nanodpo.dpo, nanodpo.tools.chat; print(nanodpo.__file__)"
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith(str(tmp_path / "site")), result.stderr[-3000:]
    for command in (["-m", "nanodpo.tools.bench", "sft", "--quick"], ["-m", "nanodpo.demo.family"]):
        result = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 2, (command, result.stderr[-3000:])
        assert "is not at" in result.stderr and "the installed nanodpo package holds the library only" in result.stderr
        assert "Use nanodpo from a clone of its repository" in result.stderr and "Traceback" not in result.stderr
