"""The model card: a README.md written into every folder that holds a model (the final output and each checkpoint), as
TRL does: what it was trained from, on what, how, and where it ended up.

The YAML front matter is what the Hugging Face hub reads (library_name, base_model, tags, datasets, license,
pipeline_tag); hub ids only, since a local path means nothing there. The text names everything, local paths too:

    ---
    library_name: transformers            # peft for a LoRA adapter
    base_model: Qwen/Qwen2.5-0.5B
    tags: [nanodpo, dpo]
    datasets: [trl-lib/ultrafeedback_binarized]
    license: apache-2.0                   # when the base model's own card says
    pipeline_tag: text-generation
    ---
    # qwen2.5-0.5b-dpo
    ... method, data, key options, the last logged metrics, how to load it, how to train it again
"""

import importlib.metadata
from pathlib import Path

import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from nanodpo.tracking import read_metrics

METHODS = {  # the config class -> (tag, what the method is)
    "PTConfig": ("pretraining", "causal language modelling (next-token prediction)"),
    "SFTConfig": ("sft", "supervised fine-tuning (next-token loss on the answers)"),
    "DPOConfig": ("dpo", "Direct Preference Optimization ([Rafailov et al., 2023](https://huggingface.co/papers/"
                         "2305.18290)) and its family"),
}  # fmt: skip
SCRIPTS = {"PTConfig": "train_pt.py", "SFTConfig": "train_sft.py", "DPOConfig": "train_dpo.py"}
# The options a reader of the card wants first; the card's folder holds config.yaml with all of them.
KEY_OPTIONS = {
    "common": ["learning_rate", "lr_scheduler_type", "warmup_ratio", "num_train_epochs", "max_steps",
               "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "dtype", "bf16", "fp16",
               "use_lora", "lora_r", "lora_alpha", "lora_target_modules", "load_in_4bit", "seed"],
    "PTConfig": ["from_scratch", "packing_strategy", "streaming"],
    "SFTConfig": ["chat_template", "packing", "train_on_prompt", "eos_token"],
    "DPOConfig": ["loss_type", "beta", "label_smoothing", "rpo_alpha", "reference_free", "batch_layout"],
}  # fmt: skip
LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_target_modules", "load_in_4bit")


def is_hub_id(name: str) -> bool:
    """A name the hub can know (NAME or ORG/NAME), not a local path, file or pattern."""
    if Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def base_model_license(model: str) -> str | None:
    """The license in the base model's own card, where it is a local folder with one."""
    card = Path(model).expanduser() / "README.md"
    if not card.is_file():
        return None
    parts = card.read_text(encoding="utf-8", errors="replace").split("---", 2)
    try:
        meta = yaml.safe_load(parts[1]) if len(parts) == 3 and not parts[0].strip() else None
    except yaml.YAMLError:
        return None
    return meta.get("license") if isinstance(meta, dict) else None


def last_records(metrics_file: Path) -> tuple[dict, dict]:
    """The last training record and the last evaluation record of metrics.jsonl (empty where there is none)."""
    records = read_metrics(metrics_file) if metrics_file.is_file() else []
    train = next((r for r in reversed(records) if "loss" in r), {})
    evaluation = next((r for r in reversed(records) if "eval_loss" in r), {})
    return train, evaluation


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _metrics_table(record: dict) -> list[str]:
    rows = [f"| {name} | {_value(value)} |" for name, value in record.items() if name != "step"]
    return ["| metric | value |", "|---|---|", *rows]


def model_card(cfg, where: str, adapter: bool, processes: int = 1) -> str:
    """The README.md text for the model of the folder `where` (OUTPUT_DIR's name, or NAME/checkpoint-<step>) trained
    with `cfg` on `processes` processes (see the module docstring); reads OUTPUT_DIR/metrics.jsonl."""
    kind = type(cfg).__name__
    tag, method = METHODS.get(kind, ("nanodpo", "nanodpo"))
    from_scratch = getattr(cfg, "from_scratch", False)
    base = None if from_scratch or not is_hub_id(cfg.model) else cfg.model
    datasets = [d for d in cfg.dataset if is_hub_id(d)]
    license_ = None if from_scratch else base_model_license(cfg.model)
    meta = {"library_name": "peft" if adapter else "transformers", "base_model": base,
            "tags": ["nanodpo", tag] + (["lora"] if cfg.use_lora else []), "datasets": datasets or None,
            "license": license_, "pipeline_tag": "text-generation"}  # fmt: skip
    front = yaml.safe_dump({k: v for k, v in meta.items() if v is not None}, sort_keys=False, allow_unicode=True)

    source = f"the `{cfg.model}` architecture, trained from scratch," if from_scratch else f"`{cfg.model}`"
    data = ", ".join(f"`{d}`" for d in cfg.dataset) + f" (split `{cfg.dataset_split}`)"
    lines = [
        f"---\n{front}---", "", f"# {where}", "",
        f"This model is {source} trained with nanodpo's `{SCRIPTS.get(kind, '')}`: {method}, on {data}.",
        "", "## Training", "", "| option | value |", "|---|---|",
    ]  # fmt: skip
    options = KEY_OPTIONS["common"] + KEY_OPTIONS.get(kind, [])
    for option in options:
        value = getattr(cfg, option, None)
        if value is None or (option in LORA_OPTIONS and not cfg.use_lora) or (option == "max_steps" and value <= 0):
            continue
        lines.append(f"| {option} | {_value(value)} |")
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes
    lines.append(f"| processes (global batch) | {processes} ({global_batch}) |")

    train, evaluation = last_records(Path(cfg.output_dir) / "metrics.jsonl")
    lines += ["", "## Results", ""]
    if not train and not evaluation:
        lines.append("No metrics were logged (metrics.jsonl is written with --report_to jsonl).")
    if train:
        lines += [f"Training, at step {train['step']} (the last logged interval's mean):", "", *_metrics_table(train)]
    if evaluation:
        lines += ["", f"Evaluation, at step {evaluation['step']}:", "", *_metrics_table(evaluation)]

    loader = ("from peft import AutoPeftModelForCausalLM as Model" if adapter
              else "from transformers import AutoModelForCausalLM as Model")  # fmt: skip
    lines += [
        "", "## Use", "", "```python", loader, "from transformers import AutoTokenizer", "",
        f'model = Model.from_pretrained("{where}")', f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```",
        "", f"Chat with it: `python -m nanodpo.tools.chat --model {where}`. Train it again: "
        f"`python {SCRIPTS.get(kind, 'train_*.py')} --config {where}/config.yaml` (every option of this run).",
        "", "## Framework versions", "",
    ]  # fmt: skip
    for package in ["nanodpo", "torch", "transformers", "accelerate", "datasets"] + (["peft"] if adapter else []):
        try:
            lines.append(f"- {package}: {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def write_model_card(cfg, directory: Path, final: Path, adapter: bool, processes: int = 1) -> None:
    """README.md into `directory` (where the files are being written) for the model that will be at `final`."""
    final, parent = Path(final).absolute(), Path(cfg.output_dir).absolute().parent
    where = str(final.relative_to(parent)) if final.is_relative_to(parent) else final.name
    (Path(directory) / "README.md").write_text(model_card(cfg, where, adapter, processes), encoding="utf-8")
