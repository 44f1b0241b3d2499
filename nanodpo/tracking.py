"""Where the metrics go: `OUTPUT_DIR/metrics.jsonl` (always), wandb, tensorboard — and a mean over each logging
interval.

Only the main process creates a `Tracker`; the others get a no-op (see `make_tracker`).

metrics.jsonl holds one JSON object per line: training records `{"step", "epoch", "loss", "grad_norm",
"learning_rate", "rewards/margins", ...}` and evaluation records with `eval_`-prefixed names
(`{"step", "epoch", "eval_loss", "eval_rewards/accuracies", ...}`) — the names TRL/HF Trainer log.
"""

import inspect
import json
import math
import os
from pathlib import Path

from nanodpo.errors import UserError, missing_extra, require_extra


class MetricMeans:
    """Collects per-micro-batch metric values and returns their unweighted means (TRL's reduction over an interval).

    The loops keep the values in `RunState.pending_metrics` (`MetricMeans(state.pending_metrics)`): every checkpoint
    then saves the unfinished logging interval as it is, and a resumed run goes on from it, logging the same means
    as an uninterrupted run.
    """

    def __init__(self, values: dict[str, list[float]] | None = None):
        self.values = {} if values is None else values

    def add(self, *metrics: dict[str, float]) -> None:
        """One value per name of each dict (e.g. one dict per process, from training.gather_metrics)."""
        for values in metrics:
            for name, value in values.items():
                self.values.setdefault(name, []).append(float(value))

    def pop_means(self) -> dict[str, float]:
        means = {name: sum(vals) / len(vals) for name, vals in self.values.items() if vals}
        self.values.clear()
        return means


def train_record(means: MetricMeans, state, **values) -> dict[str, float]:
    """A training record: the interval's metric means, then `values` (grad_norm, learning_rate, epoch, ...), the
    tokens trained on so far, once there is one the count of skipped non-finite steps, and under fp16 loss scaling
    the last step's loss scale with the count of overflows the scaler skipped."""
    record = {**means.pop_means(), **values, "num_tokens": state.num_tokens}
    if state.nonfinite_total:
        record["nonfinite_steps_skipped"] = state.nonfinite_total
    if state.loss_scale is not None:
        record["loss_scale"] = state.loss_scale
        record["overflow_steps_skipped"] = state.overflow_total
    return record


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token, the PaLM appendix estimate with frozen weights told apart: a weight matrix of N
    parameters costs 2·N in forward, 2·N in backward for the gradient of its input and, if it is trained, 2·N for
    its own gradient — 6·N trained, 4·N frozen (LoRA's base weights) — and attention's scores and values 12·L·d·T
    (forward + backward, T = seq_len). The input embeddings are a lookup, not a matmul: not counted (a tied LM head
    is, as the head). N is each parameter's full size, also under ZeRO-3 (`numel`). MFU = this · tokens/s / peak."""
    from nanodpo.model import numel  # (imported here: this module is read by tools that need no torch)

    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    counted = [p for p in model.parameters() if p is not embeddings or (head is not None and head.weight is p)]
    weights = sum((6 if p.requires_grad else 4) * numel(p) for p in counted)
    config = model.config
    return weights + 12 * config.num_hidden_layers * config.hidden_size * seq_len


class Tracker:
    def __init__(self, cfg, output_dir: str | Path, config_dict: dict, samples=None):
        self.output_dir = Path(output_dir)
        self.report_to = list(cfg.report_to)
        self.samples = samples  # () -> rows of text to log with the next record (online DPO), or None
        self.jsonl = None
        self.wandb_run = None
        self.tb_writer = None
        run_name = cfg.run_name or self.output_dir.name
        if "jsonl" in self.report_to:
            self.jsonl = (self.output_dir / "metrics.jsonl").open("a", encoding="utf-8")
        # wandb and tensorboard are imported only when asked for: each takes seconds to import.
        if "wandb" in self.report_to:
            import wandb

            # The API key comes from `wandb login` / WANDB_API_KEY and is never written into the config or logs.
            self.wandb_run = wandb.init(
                project=cfg.wandb_project, name=run_name, config=config_dict, dir=str(self.output_dir)
            )
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_writer = SummaryWriter(log_dir=str(self.output_dir / "runs" / run_name))

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.wandb_run is not None:
            # wandb groups panels by the prefix before '/': train/..., eval/... as HF Trainer reports them.
            self.wandb_run.log({_wandb_name(k): v for k, v in metrics.items()}, step=step)
        if self.tb_writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb_writer.add_scalar(_wandb_name(name), value, step)
            self.tb_writer.flush()
        if self.samples is not None:
            self.log_samples(self.samples(), step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        """Rows of text (online DPO: prompt, chosen, rejected, scores) into OUTPUT_DIR/samples.jsonl, a wandb table
        and tensorboard text, all under `step`."""
        if not rows:
            return
        rows = [{"step": step, **row} for row in rows]
        with (self.output_dir / "samples.jsonl").open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        columns = list(rows[0])
        if self.wandb_run is not None:
            import wandb

            table = wandb.Table(columns=columns, data=[[str(row[c]) for c in columns] for row in rows])
            self.wandb_run.log({"samples": table}, step=step)
        if self.tb_writer is not None:
            lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            lines += ["| " + " | ".join(str(row[c]).replace("|", "\\|") for c in columns) + " |" for row in rows]
            self.tb_writer.add_text("samples", "\n".join(lines), step)
            self.tb_writer.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tb_writer is not None:
            self.tb_writer.close()


class NullTracker:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def check_trackers(cfg, env) -> None:
    """Refuse, before anything heavy runs, a --report_to tracker that would fail only at its first use — after the
    data is tokenized, the model loaded and the reference log-probs computed: wandb or tensorboard not installed,
    or wandb without a login (`wandb login` or WANDB_API_KEY) unless it logs offline or is disabled (WANDB_MODE)."""
    if "tensorboard" in cfg.report_to:  # optional packages (pyproject.toml's extras of the same names)
        require_extra("tensorboard", "tensorboard", "--report_to tensorboard")
    if "wandb" not in cfg.report_to:
        return
    try:
        import wandb
    except ImportError:
        raise missing_extra("wandb", "wandb", "--report_to wandb") from None
    if env.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return
    if not wandb_logged_in(wandb):
        raise UserError(
            "--report_to wandb, but wandb has no login here: run `wandb login` (or set WANDB_API_KEY), or log "
            "offline with WANDB_MODE=offline (then `wandb sync`); metrics.jsonl is written either way"
        )


def wandb_logged_in(wandb) -> bool:
    """Whether wandb has credentials (environment, netrc, settings), without prompting or contacting its server."""
    if "prompt" in inspect.signature(wandb.login).parameters:
        return wandb.login(prompt=False, verify=False)
    return bool(wandb.api.api_key)  # wandb before login(prompt=...): its own lookup of the same credentials


def make_tracker(cfg, accelerator, config_dict: dict, samples=None):
    """The main process's Tracker (the others': a no-op). `samples`: () -> text rows to log with the next record
    (online DPO's sampled pairs), or None."""
    if not accelerator.is_main_process or not cfg.report_to:
        return NullTracker()
    os.makedirs(cfg.output_dir, exist_ok=True)
    return Tracker(cfg, cfg.output_dir, config_dict, samples)


def _wandb_name(name: str) -> str:
    if name.startswith("eval_"):
        return "eval/" + name[len("eval_") :]
    if name in ("epoch",):
        return "train/epoch"
    return "train/" + name


def _clean(value):
    """JSON has no NaN/inf: write them as strings so a diverged run still leaves a readable file."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str | Path) -> list[dict]:
    """Read a metrics.jsonl back (used by tests and nanodpo.tools.plot)."""
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records
