"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's OnlineDPOTrainer):
the DPO step of nanodpo/dpo.py on pairs the policy itself has just sampled and a judge has ranked.

Offline DPO learns from pairs some other model wrote. Online, every micro-batch of prompts becomes its pairs on the
spot, from the current weights:

    prompts   x_1 .. x_B, left-padded                                           (PromptCollator)
    sample    two answers per prompt: rows [x_1 .. x_B; x_1 .. x_B]              (nanodpo/generation.py)
    judge     s = Σ_j w_j · judge_j(x, y), minus --missing_eos_penalty if y never ended
    rank      chosen = the answer of row i if s_i >= s_{i+B}, else that of row i+B; rejected = the other
    collate   [prompt + chosen; prompt + rejected], exactly an offline pair batch  (nanodpo/dpo_batch.py)
    DPO step  the same forward, reference and loss as offline                     (nanodpo/dpo.py)

So online DPO is another source of pairs for the same step: `PairSampler` is to prompts what the collator is to
offline pairs, and `online_forward` runs it, then the step's own forward. nanodpo/recipe.py chooses it once, at
setup (--online); train_dpo.py's loop does not know.

Metrics, TRL's names: objective/scores (mean score of all answers), objective/scores_margin (chosen − rejected),
val/contain_eos_token (the share of answers that ended), objective/kl = the mean over answers of
log π_θ(y|x) − log π_ref(y|x), objective/entropy = −mean log π_θ(y|x), objective/non_score_reward = −β·kl and
objective/rlhf_reward = score − β·kl (what RLHF maximises); completions/mean_length (tokens per answer).
"""

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

from nanodpo import training
from nanodpo.data import EpochSampler, load_split_rows
from nanodpo.dpo import DPOOutput
from nanodpo.dpo_data import apply_template, chat_template_kwargs, check_value
from nanodpo.errors import UserError
from nanodpo.generation import sample_completions
from nanodpo.losses.metrics import dpo_metrics, dpo_pair_stats, pair_stats_metrics
from nanodpo.model import DTYPES, prepare_reference, unwrap

# ----------------------------------------------------------------------------------------------------------------
# 1. The prompts: rows -> token ids (at setup), micro-batches of them (in the loop).

ANSWER_COLUMNS = ("chosen", "rejected", "completion", "messages", "conversations")


def load_prompts(cfg, tokenizer, split: str = "train") -> list[dict] | None:
    """Prompt examples of `split` ("train" or "eval"; None when there is no eval data): {"prompt" (as in the row),
    "prompt_ids", "columns" (the row's other fields, for the judges), "origin"}. Each prompt keeps its last
    --max_length − --max_new_tokens tokens, so prompt + answer always fit. On the train split every --judge is also
    tried once on the first prompts, so a judge that breaks fails now, before anything loads or is written."""
    rows = load_split_rows(cfg, split)
    if rows is None:
        return None
    if not rows:
        raise UserError(f"the {split} prompts dataset has no rows")
    room = None if cfg.max_length is None else cfg.max_length - cfg.max_new_tokens
    examples = [prompt_example(row, tokenizer, room) for row in rows]
    cut = sum(ex.pop("cut") for ex in examples)
    print(f"prompts ({split}): {len(examples)} rows read" + (f", {cut} cut to their last {room} tokens" if cut else ""))
    if split == "train":
        try_judges(cfg, tokenizer, examples[:2])
    else:  # eval draws are negative: the same answers' seeds at every evaluation, never a training draw's
        examples = [{**ex, "draw": -1 - i} for i, ex in enumerate(examples)]
    return examples


def prompt_example(row, tokenizer, room: int | None) -> dict:
    """One prompt row, checked and tokenized as TRL's OnlineDPOTrainer does: the chat template with the assistant's
    turn opened (conversations), or the text as it is (strings); no special tokens added."""
    data = row.data
    for name in ANSWER_COLUMNS:
        if name in data:
            raise UserError(
                f"{row.where(name)}: online DPO samples its own answers, so its rows are prompts only ('prompt' and "
                f"any columns the judges read); drop the answers (e.g. jq -c 'del(.{name})')"
            )
    if "prompt" not in data:
        raise UserError(f"{row.where('prompt')}: missing; online DPO rows need a 'prompt' (a string or messages)")
    prompt = data["prompt"]
    check_value(row, "prompt", prompt)
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"{row.where('prompt')}: a conversation needs a chat template, and this tokenizer has none; pass one "
                "with --chat_template, or use string prompts"
            )
        if prompt[-1]["role"] not in ("user", "tool"):
            raise UserError(
                f"{row.where('prompt')}: its last message is from '{prompt[-1]['role']}'; an online DPO prompt ends "
                "with the user's turn (or a tool result), and the policy samples the assistant's answer to it"
            )
        ids = apply_template(row, tokenizer, prompt, add_generation_prompt=True, **chat_template_kwargs(row))
    else:
        ids = tokenizer(text=prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"{row.where('prompt')}: the prompt has no tokens; the policy needs something to answer")
    cut = room is not None and len(ids) > room
    columns = {name: value for name, value in data.items() if name != "prompt"}
    return {"prompt": prompt, "prompt_ids": ids[-room:] if cut else ids, "columns": columns, "origin": row.where(),
            "cut": cut}  # fmt: skip


class EpochDraws(EpochSampler):
    """EpochSampler's order, each index numbered as a draw of the whole run: epoch × rows + index."""

    def __iter__(self):
        return (self.epoch * self.num_rows + i for i in super().__iter__())


class Draws:
    """The prompt examples indexed by draw (`EpochDraws`), each tagged with it."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, draw: int) -> dict:
        return {**self.examples[draw % len(self.examples)], "draw": draw}


def make_prompt_loader(examples: list[dict], collate_fn, cfg) -> torch.utils.data.DataLoader:
    """Micro-batches of --per_device_train_batch_size prompts in EpochSampler's order, each prompt tagged with its
    draw: the numbers a micro-batch's random seed comes from (`draw_seed`)."""
    sampler = EpochDraws(len(examples), shuffle=cfg.train_sampling_strategy == "random", seed=cfg.seed)
    return torch.utils.data.DataLoader(
        Draws(examples), batch_size=cfg.per_device_train_batch_size, sampler=sampler, collate_fn=collate_fn
    )


@dataclass
class PromptCollator:
    """A micro-batch of prompts, left-padded so that every row's last prompt token is in the last column, where
    sampling continues; with what the judges read (the prompts as given, their other columns) and the draws."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        width = max(len(ex["prompt_ids"]) for ex in examples)
        pads = [width - len(ex["prompt_ids"]) for ex in examples]
        ids = [ex["prompt_ids"] for ex in examples]
        return {
            "prompt_input_ids": torch.tensor([[self.pad_token_id] * n + row for row, n in zip(ids, pads)]),
            "prompt_attention_mask": torch.tensor([[0] * n + [1] * len(row) for row, n in zip(ids, pads)]),
            "prompt_ids": ids,
            "prompts": [ex["prompt"] for ex in examples],
            "columns": [ex["columns"] for ex in examples],
            "draws": [ex["draw"] for ex in examples],
        }  # fmt: skip


def draw_seed(seed: int, draws: list[int]) -> int:
    """The random seed of a micro-batch's answers, from --seed and its prompts' draws: the same prompts at the same
    point of the run are answered alike on any number of processes, and after a resume."""
    digest = hashlib.sha256(f"{seed}:{list(draws)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any torch.Generator seed


# ----------------------------------------------------------------------------------------------------------------
# 2. The judges: each a callable (prompts, completions, completion_ids, columns) -> scores [N] (float32, CPU).


def checked_scores(values, name: str, prompts: list, completions: list) -> torch.Tensor:
    """A judge's scores as a float32 tensor, or a UserError naming the judge and the answer it failed on: one finite
    number per answer (TRL would take NaN/None as "no score"; one bad score would silently skew a pair)."""
    if isinstance(values, torch.Tensor) or hasattr(values, "tolist"):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
        raise UserError(f"judge {name} returned {got} for {len(completions)} answers; it must return one score each")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise UserError(
                f"judge {name} scored answer {i} {value!r} (prompt {str(prompts[i])[:80]!r}, answer "
                f"{str(completions[i])[:80]!r}); every answer needs a finite number"
            )
    return torch.tensor([float(value) for value in values], dtype=torch.float32)


def import_judge(spec: str) -> Callable:
    """--judge module:function (a module importable from here or the current folder), or path/to/file.py:function."""
    module_name, _, name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            location = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if location is None or not Path(module_name).is_file():
                raise UserError(f"--judge {spec}: no such file {module_name}")
            module = importlib.util.module_from_spec(location)
            location.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"--judge {spec}: cannot import {module_name} ({err})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"--judge {spec}: {module_name} has no function {name}")
    return function


@dataclass
class FunctionJudge:
    """A --judge function, called with keyword arguments as TRL calls reward functions: prompts, completions (text;
    for conversations [{"role": "assistant", "content": ...}]), completion_ids and every other column of the prompt
    rows — or only those its signature names, when it takes no **kwargs."""

    name: str
    function: Callable

    def __call__(self, prompts, completions, completion_ids, columns) -> torch.Tensor:
        kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
        parameters = inspect.signature(self.function).parameters
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            kwargs = {key: value for key, value in kwargs.items() if key in parameters}
        return checked_scores(self.function(**kwargs), self.name, prompts, completions)


def check_reward_model(path: str, cfg):
    """The config of a --reward_model: a sequence classifier with one output (its score). A causal LM would load as
    one too — with a randomly initialised head: scores of noise."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"--reward_model {path}: cannot load its config ({err})") from None
    architectures = config.architectures or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise UserError(
            f"--reward_model {path}: a {', '.join(architectures) or 'model without architectures'}, not a sequence "
            "classifier (e.g. Qwen2ForSequenceClassification) trained to score answers; pass a reward model, or a "
            "rule as --judge module:function"
        )
    if config.num_labels != 1:
        raise UserError(f"--reward_model {path}: it has {config.num_labels} outputs; a reward model has one (a score)")
    return config


@dataclass
class RewardModelJudge:
    """A --reward_model: a sequence classifier scoring prompt + answer, read with its own tokenizer — conversations
    rendered with its own chat template (TRL's way: the policy's tokens are decoded to text, then re-encoded)."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device

    @classmethod
    def load(cls, path: str, cfg, accelerator) -> "RewardModelJudge":
        check_reward_model(path, cfg)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, output_loading_info=True
        )
        if info["missing_keys"]:
            raise UserError(f"--reward_model {path}: weights missing from its checkpoint ({info['missing_keys'][:3]})")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads the last token that is not padding
        device = accelerator.device if accelerator is not None else torch.device("cpu")
        model = prepare_reference(accelerator, model) if accelerator is not None else model.requires_grad_(False).eval()
        return cls(path, model, tokenizer, device)

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids, columns) -> torch.Tensor:
        if isinstance(prompts[0], str):
            texts = [p + c for p, c in zip(prompts, completions)]
        else:
            texts = [self.tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        inputs = self.tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right",
                                add_special_tokens=False).to(self.device)  # fmt: skip
        return checked_scores(self.model(**inputs).logits[:, 0].float().cpu(), self.name, prompts, completions)


def load_judges(cfg, accelerator) -> list:
    """--reward_model judges first, then --judge functions (the order of --reward_weights)."""
    judges = [RewardModelJudge.load(path, cfg, accelerator) for path in cfg.reward_model]
    return judges + [FunctionJudge(spec, import_judge(spec)) for spec in cfg.judge]


def try_judges(cfg, tokenizer, examples: list[dict]) -> None:
    """Before anything loads: every --reward_model is a sequence classifier, and every --judge scores answers —
    called on these prompts, twice each, with empty answers (an answer that is only the EOS token)."""
    for path in cfg.reward_model:
        check_reward_model(path, cfg)
    prompts = [ex["prompt"] for ex in examples] * 2
    empty = [[{"role": "assistant", "content": ""}] if isinstance(p, list) else "" for p in prompts]
    columns = {name: [ex["columns"].get(name) for ex in examples] * 2 for name in examples[0]["columns"]}
    for spec in cfg.judge:
        FunctionJudge(spec, import_judge(spec))(prompts, empty, [[tokenizer.eos_token_id]] * len(prompts), columns)


# ----------------------------------------------------------------------------------------------------------------
# 3. The source of pairs, and the step around it.


@dataclass
class SampleLog:
    """The first `size` pairs of the latest micro-batch, as text, until the tracker takes them (every
    --logging_steps: OUTPUT_DIR/samples.jsonl, wandb, tensorboard): what the judge preferred, to read."""

    size: int
    rows: list = field(default_factory=list)

    def keep(self, prompts, draws, chosen, rejected, chosen_scores, rejected_scores) -> None:
        self.rows = [
            {"split": "eval" if draw < 0 else "train", "prompt": prompt, "chosen": c, "rejected": r,
             "chosen_score": float(cs), "rejected_score": float(rs)}
            for prompt, draw, c, r, cs, rs in zip(prompts, draws, chosen, rejected, chosen_scores, rejected_scores)
        ][: self.size]  # fmt: skip

    def take(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows


@dataclass
class PairSampler:
    """Online DPO's source of pairs: a micro-batch of prompts in, the step's [chosen; rejected] batch out."""

    judges: list  # callables (prompts, completions, completion_ids, columns) -> scores [N]
    weights: torch.Tensor  # [len(judges)] --reward_weights
    collator: Callable  # pair examples -> the step's batch, in its --batch_layout
    tokenizer: object
    sampling: dict  # sample_completions' options: max_new_tokens, temperature, top_p, stop_ids, pad_id, to_the_end
    seed: int
    missing_eos_penalty: float | None
    unwrap_model: Callable
    samples: SampleLog

    def __call__(self, policy, batch: dict) -> dict:
        # 1. Sample: two answers per prompt (rows i and i + B), from the current weights, reproducibly.
        prompt_ids, prompt_mask = batch["prompt_input_ids"].repeat(2, 1), batch["prompt_attention_mask"].repeat(2, 1)
        generator = torch.Generator(prompt_ids.device).manual_seed(draw_seed(self.seed, batch["draws"]))
        with training.eval_mode(policy):
            completion_ids = sample_completions(self.unwrap_model(policy), prompt_ids, prompt_mask,
                                                generator=generator, **self.sampling)  # fmt: skip
        ends = torch.isin(completion_ids, self.sampling["stop_ids"]).cpu()
        contain_eos = ends.any(dim=1)
        lengths = torch.where(contain_eos, ends.int().argmax(dim=1) + 1, ends.shape[1])  # through the EOS
        answers = [ids[:n] for ids, n in zip(completion_ids.tolist(), lengths.tolist())]

        # 2. Judge: decoded text (as conversations' assistant messages), weighted judges summed.
        prompts = batch["prompts"] * 2
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                       for p, t in zip(prompts, texts)]  # fmt: skip
        columns = {name: [c.get(name) for c in batch["columns"]] * 2 for name in batch["columns"][0]}
        scores = torch.stack([judge(prompts, completions, answers, columns) for judge in self.judges], dim=1)
        scores = (scores * self.weights).sum(dim=1)
        if self.missing_eos_penalty is not None:
            scores[~contain_eos] -= self.missing_eos_penalty

        # 3. Rank: the higher score is chosen (a tie: the first answer).
        half = len(batch["prompts"])
        first_wins = (scores[:half] >= scores[half:]).tolist()
        chosen = [i if wins else i + half for i, wins in enumerate(first_wins)]
        rejected = [i + half if wins else i for i, wins in enumerate(first_wins)]
        self.samples.keep(batch["prompts"], batch["draws"], [texts[i] for i in chosen], [texts[i] for i in rejected],
                          scores[chosen], scores[rejected])  # fmt: skip

        # 4. The pairs, collated exactly as offline ones; what the metrics read rides along, [chosen; rejected].
        pairs = self.collator([{"prompt_ids": p, "chosen_ids": answers[c], "rejected_ids": answers[r]}
                               for p, c, r in zip(batch["prompt_ids"], chosen, rejected)])  # fmt: skip
        order = chosen + rejected
        pairs.update(scores=scores[order], contain_eos=contain_eos[order], lengths=lengths[order].float())
        return {name: value.to(prompt_ids.device) if torch.is_tensor(value) else value for name, value in pairs.items()}


@dataclass
class OnlineOutput(DPOOutput):
    """The step's DPOOutput and what the judges said, each [2B] laid out [chosen; rejected]."""

    scores: torch.Tensor | None = None  # the summed judge score of each answer (after the missing-EOS penalty)
    contain_eos: torch.Tensor | None = None  # the answer ended (sampled a stop token)
    lengths: torch.Tensor | None = None  # the answer's tokens


def online_forward(policy, batch: dict, *, sample_pairs, forward):
    """Sample and judge this micro-batch's pairs, then the step's own forward on them (chosen at setup: a DPO
    forward, as for offline pairs). The prompt batch is filled in with the pair batch it became, so the loop's token
    count and padding fraction describe what was trained on. Returns (OnlineOutput, the policy's TokenStats)."""
    batch.update(sample_pairs(policy, batch))
    out, policy_stats = forward(policy, batch)
    judged = {name: batch[name] for name in ("scores", "contain_eos", "lengths")}
    return OnlineOutput(**vars(out), **judged), policy_stats


@torch.no_grad()
def online_metrics(out: OnlineOutput, policy_stats, *, beta: float) -> dict[str, float]:
    """The DPO metrics (rewards/*, logps/*, ...) and TRL's objective/* of one micro-batch. β·ρ is the implicit reward
    (nanodpo/dpo.py), so ρ = reward / β is each answer's log π_θ − log π_ref: its mean is the KL estimate."""
    metrics = dpo_metrics(out, policy_stats)
    chosen_scores, rejected_scores = out.scores.chunk(2)
    kl = (out.chosen_rewards.mean() + out.rejected_rewards.mean()).item() / (2 * beta)
    metrics.update({
        "objective/scores": out.scores.mean().item(),
        "objective/scores_margin": (chosen_scores - rejected_scores).mean().item(),
        "objective/kl": kl,
        "objective/entropy": -(out.chosen_logps.mean() + out.rejected_logps.mean()).item() / 2,
        "objective/non_score_reward": -beta * kl,
        "objective/rlhf_reward": out.scores.mean().item() - beta * kl,
        "val/contain_eos_token": out.contain_eos.float().mean().item(),
        "completions/mean_length": out.lengths.mean().item(),
    })  # fmt: skip
    return metrics


# Over a set of pairs (an eval set): per-pair values, then means over the pairs.
ONLINE_PAIR_MEANS = ("objective/scores", "objective/scores_margin", "objective/kl", "val/contain_eos_token",
                     "completions/mean_length")  # fmt: skip


@torch.no_grad()
def online_pair_stats(out: OnlineOutput, policy_stats, *, beta: float) -> dict[str, torch.Tensor]:
    """`dpo_pair_stats` and the judges' values per pair [B] (a pair's two answers averaged), for a whole eval set."""
    chosen_scores, rejected_scores = out.scores.chunk(2)
    return {
        **dpo_pair_stats(out, policy_stats),
        "objective/scores": (chosen_scores + rejected_scores) / 2,
        "objective/scores_margin": chosen_scores - rejected_scores,
        "objective/kl": (out.chosen_rewards + out.rejected_rewards).float() / (2 * beta),
        "val/contain_eos_token": out.contain_eos.float().view(2, -1).mean(0),
        "completions/mean_length": out.lengths.view(2, -1).mean(0),
    }


def online_stats_metrics(stats: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """`pair_stats_metrics` of gathered `online_pair_stats`, with the judges' means over all pairs."""
    metrics = pair_stats_metrics(stats, prefix)
    metrics.update({prefix + name: float(stats[name].double().mean()) for name in ONLINE_PAIR_MEANS})
    return metrics


def online_step(step, cfg, tokenizer, accelerator, pair_collator):
    """`step` (a recipe.DPOStep) with its forward wrapped by the sampling and judging of pairs, and online DPO's
    metrics. Loads the judges."""
    from accelerate.utils import DistributedType

    device = accelerator.device if accelerator is not None else torch.device("cpu")
    # Under FSDP / ZeRO-3 every forward gathers weights from all processes: they must all sample as many tokens.
    sharded = accelerator is not None and accelerator.num_processes > 1 and accelerator.distributed_type in (
        DistributedType.FSDP, DistributedType.DEEPSPEED)  # fmt: skip
    judges = load_judges(cfg, accelerator)
    sampler = PairSampler(
        judges=judges,
        weights=torch.tensor(cfg.reward_weights or [1.0] * len(judges), dtype=torch.float32),
        collator=pair_collator,
        tokenizer=tokenizer,
        sampling=dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                      stop_ids=torch.tensor(stop_token_ids(cfg, tokenizer), device=device),
                      pad_id=tokenizer.pad_token_id, to_the_end=sharded),  # fmt: skip
        seed=cfg.seed,
        missing_eos_penalty=cfg.missing_eos_penalty,
        unwrap_model=accelerator.unwrap_model if accelerator is not None else unwrap,
        samples=SampleLog(cfg.log_samples),
    )
    return replace(
        step,
        forward=partial(online_forward, sample_pairs=sampler, forward=step.forward),
        metrics=partial(online_metrics, beta=cfg.beta),
        eval_stats=partial(online_pair_stats, beta=cfg.beta),
        eval_metrics=online_stats_metrics,
        samples=sampler.samples.take,
    )


def stop_token_ids(cfg, tokenizer) -> list[int]:
    """What ends an answer, as TRL counts it: the tokenizer's EOS and every EOS of the model's generation config
    (Qwen2.5's lists <|im_end|> and <|endoftext|>)."""
    try:
        generation = GenerationConfig.from_pretrained(cfg.model)
    except (OSError, ValueError):  # no generation_config.json: transformers derives it from the model's config
        try:
            generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(cfg.model))
        except (OSError, ValueError):
            generation = GenerationConfig()
    eos = generation.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return sorted({tokenizer.eos_token_id, *eos} - {None})
