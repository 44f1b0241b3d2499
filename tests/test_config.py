"""The option system: defaults < YAML < command line, with unknown keys and wrong types refused by name."""

import dataclasses
import typing

import pytest

from nanodpo.config import RANGES, DPOConfig, PTConfig, SFTConfig, build_arg_parser, parse_config, save_config
from nanodpo.errors import UserError

CONFIGS = (DPOConfig, SFTConfig, PTConfig)
CHECKED_WITH_THE_LOSS = {"beta", "label_smoothing", "ld_alpha", "discopop_tau"}  # nanodpo/dpo.py check_dpo_options
ANY_FINITE = {"f_alpha_divergence_coef", "loss_weights", "reward_weights"}


def numeric_options() -> dict[str, tuple[type, type]]:
    """Every int / float option of the three scripts: name -> (a config class that has it, int or float)."""
    found = {}
    for cls in CONFIGS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = {t for t in typing.get_args(hints[f.name]) or (hints[f.name],)}
            kinds |= {a for t in kinds for a in typing.get_args(t)}  # list[float]
            for kind in (int, float):
                if kind in kinds:
                    found.setdefault(f.name, (cls, kind))
    return found


def out_of_range(spec: str, kind: type) -> list[str]:
    """Values just outside `spec` ('>= 1', '> 0', '[0, 1)')."""
    if spec[0] in "[(":
        low, high = (float(x) for x in spec[1:-1].split(","))
        values = [low - 1 if spec[0] == "[" else low, high + 1 if spec[-1] == "]" else high]
    else:
        op, bound = spec.split()
        values = [float(bound) - 1 if op == ">=" else float(bound)]
    return [str(int(v)) if kind is int else str(v) for v in values]


def test_every_numeric_option_has_a_range():
    numeric = numeric_options()
    assert "learning_rate" in numeric and "stream_buffer_docs" in numeric and "max_tokens_per_batch" in numeric
    unchecked = set(numeric) - set(RANGES) - CHECKED_WITH_THE_LOSS - ANY_FINITE
    assert not unchecked, f"numeric options without a range: {sorted(unchecked)}"
    assert set(RANGES) <= set(numeric), "a range for an option that does not exist"


@pytest.mark.parametrize("name", sorted(RANGES))
def test_numbers_out_of_range_are_refused_by_name(name):
    cls, kind = numeric_options()[name]
    default = getattr(cls(), name)
    parse_config(cls, [] if default is None else [f"--{name}", str(default)])  # the default is in range
    for value in out_of_range(RANGES[name], kind):
        with pytest.raises(UserError, match=f"--{name} must be .*, got"):
            parse_config(cls, [f"--{name}={value}"])


@pytest.mark.parametrize("name", sorted(n for n, (_, kind) in numeric_options().items() if kind is float))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_float_options_must_be_finite(name, value):
    cls, _ = numeric_options()[name]
    with pytest.raises(UserError, match=f"--{name} must be a finite number, got"):
        parse_config(cls, [f"--{name}={value}"])


def test_ranges_apply_to_yaml_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("warmup_ratio: 1.5\n")
    with pytest.raises(UserError, match="--warmup_ratio must be in \\[0, 1\\], got 1.5"):
        parse_config(SFTConfig, ["--config", str(path)])


def test_defaults_match_trl_names_and_values():
    cfg = parse_config(DPOConfig, [])
    assert cfg.beta == 0.1
    assert cfg.loss_type == ["sigmoid"]
    assert cfg.learning_rate == 1e-6
    assert cfg.truncation_mode == "keep_start"
    assert cfg.report_to == ["jsonl"]


def test_yaml_then_cli_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.3\nloss_type: [sigmoid, sft]\nloss_weights: [1.0, 0.2]\nuse_lora: true\nlora_r: 4\n")
    cfg = parse_config(DPOConfig, ["--config", str(path), "--lora_r", "8", "--max_samples", "10"])
    assert cfg.beta == 0.3
    assert cfg.loss_type == ["sigmoid", "sft"]
    assert cfg.loss_weights == [1.0, 0.2]
    assert cfg.use_lora is True
    assert cfg.lora_r == 8  # the command line wins
    assert cfg.max_samples == 10


def test_boolean_flag_forms():
    assert parse_config(DPOConfig, ["--use_lora"]).use_lora is True
    assert parse_config(DPOConfig, ["--use_lora", "false"]).use_lora is False
    assert parse_config(DPOConfig, ["--disable_dropout", "no"]).disable_dropout is False


def test_report_to_all_and_none():
    assert parse_config(DPOConfig, ["--report_to", "all"]).report_to == ["jsonl", "wandb", "tensorboard"]
    assert parse_config(DPOConfig, ["--report_to", "none"]).report_to == ["jsonl"]  # metrics.jsonl is always written
    assert parse_config(DPOConfig, ["--report_to", "wandb"]).report_to == ["jsonl", "wandb"]


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        ("betta: 0.1\n", "unknown option 'betta'"),
        ("beta: fast\n", "'beta'"),
        ("lora_r: 2.5\n", "'lora_r'"),
        ("use_lora: maybe\n", "'use_lora'"),
        ("- a\n- b\n", "expected a mapping"),
        ("beta: [0.1\n", "not valid YAML"),
        ("output_dir: null\n", "'output_dir' cannot be null"),
    ],
)
def test_bad_yaml_is_refused_by_name(tmp_path, yaml_text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError) as err:
        parse_config(DPOConfig, ["--config", str(path)])
    assert needle in str(err.value)
    assert "bad.yaml" in str(err.value)


def test_bad_cli_values_are_refused_by_name():
    with pytest.raises(UserError, match="lr_scheduler_type"):
        parse_config(DPOConfig, ["--lr_scheduler_type", "exponential"])
    with pytest.raises(UserError, match="per_device_train_batch_size"):
        parse_config(DPOConfig, ["--per_device_train_batch_size", "four"])
    with pytest.raises(UserError, match="no such file"):
        parse_config(DPOConfig, ["--config", "/nonexistent/x.yaml"])


def test_saved_config_reproduces_the_run(tmp_path):
    cfg = parse_config(DPOConfig, ["--beta", "0.25", "--loss_type", "ipo", "--use_lora"])
    save_config(cfg, tmp_path / "config.yaml")
    again = parse_config(DPOConfig, ["--config", str(tmp_path / "config.yaml")])
    assert again == cfg


def test_every_option_has_help():
    parser = build_arg_parser(DPOConfig)
    for action in parser._actions:
        if action.dest not in ("help", "config"):
            assert action.help and not action.help.startswith(" (default"), action.dest


def test_shipped_dpo_configs_parse():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("dpo_*.yaml"))
    assert configs
    for path in configs:
        cfg = parse_config(DPOConfig, ["--config", str(path)])
        assert cfg.model and cfg.dataset, path


def test_shipped_pt_and_sft_configs_parse():
    from pathlib import Path

    from nanodpo.config import PTConfig, SFTConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    for cls, pattern in [(SFTConfig, "sft_*.yaml"), (PTConfig, "pt_*.yaml")]:
        paths = sorted(root.glob(pattern))
        assert paths, pattern
        for path in paths:
            assert parse_config(cls, ["--config", str(path)]).model, path
