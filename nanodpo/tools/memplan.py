"""A memory plan for DPO, per GPU, from formulas: what each piece of a training step holds, before you rent the GPUs.

    python -m nanodpo.tools.memplan                                  # Qwen2.5-0.5B/1.5B/7B, the five setups below
    python -m nanodpo.tools.memplan --pairs 1 --max_length 2048 --gpus 8 --lora_r 64

Setups (per GPU; `--gpus` for DDP and FSDP2):
  qlora_1gpu      one GPU, 4-bit NF4 base weights (bitsandbytes, double quantization) + a LoRA adapter
  lora_ddp        DDP: a bf16 copy of the base on every GPU + a LoRA adapter
  full_fsdp2      FSDP2 full fine-tuning, the reference online (a frozen bf16 copy, sharded like the policy)
  full_fsdp2_pre  FSDP2 full fine-tuning, reference log-probs precomputed (no reference model during training)
  full_1gpu_pre   one GPU, full fine-tuning of fp32 weights with bf16 autocast, reference log-probs precomputed (DDP:
                  the same on every GPU, plus its gradient buckets, 4 bytes per parameter)

Pieces, in bytes (P = parameters, N = GPUs, T = tokens of one micro-batch = 2 × pairs × max_length, the padded
upper bound; packed layouts hold fewer):
  weights         bf16 base: 2P; 4-bit linear layers: 0.5 B/param + their quantization constants (block 64; double
                  quantization: 1 byte per block + 4 bytes per 256 blocks); what is not a linear layer (embeddings,
                  untied LM head, norms) kept fp32 for training (`prepare_for_kbit_training`); FSDP2: fp32 master
                  weights sharded, 4P/N, plus the bf16 copy of the units being gathered (two decoder layers and the
                  LM head's unit, which accelerate keeps gathered between forward and backward); one GPU, full:
                  fp32 weights 4P plus the bf16 copies autocast makes of them in the forward, 2P (held for backward)
  gradients       fp32 of the trained parameters (LoRA: r·(in + out) per linear layer; full: P, FSDP2: /N)
  optimizer       AdamW's two fp32 moments: 8 bytes per trained parameter (/N under FSDP2)
  reference       full fine-tuning with an online reference only: a frozen bf16 copy, 2P/N under FSDP2
  activations     what backward needs, per token and decoder layer, under bf16 autocast: the fp32 inputs of the two
                  RMSNorms (2 × 4h) and, in bf16, the normed inputs, q, k, v, rotated q and k, the attention output,
                  the MLP's gate, up, SiLU(gate) and their product: 2 × (5h + 3·kv + 4·I) bytes (h hidden, kv the key/
                  value width, I the MLP width; flash/SDPA attention keeps no [T, T] scores). With gradient
                  checkpointing: each layer's bf16 input (2h per token and layer) plus one layer's activations,
                  recomputed in backward.
  logits          readable path: the [T, V] logits in fp32 and their log-softmax, and two more vocab-sized fp32
                  tensors at the peak (the metrics in forward, the gradients in backward): 16·T·V, plus 2·T·V for
                  the bf16 head output under autocast. Chunked path: two fp32 [1024, V] buffers (the CUDA chunk
                  size), whatever T is.

Checked against measurements on CPU where the two overlap (tests/test_fastpath_memory.py: the readable path's peak
above the chunked path's, predicted from `logits_bytes`, against the measured peak RSS of both). Not measured on a
GPU: no GPU was available to this project. Allocator fragmentation, CUDA context (~0.5 GB) and NCCL buffers come on
top.
"""

import argparse
from dataclasses import dataclass

GiB = 2**30
CHUNK_SIZE = 1024  # nanodpo.fast.chunked_head.CHUNK_SIZE["cuda"] (not imported: this module needs no torch)


@dataclass(frozen=True)
class Architecture:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every decoder linear layer (what 4-bit quantizes and 'all-linear' LoRA adapts)."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o, gate up down
        return per_layer * self.layers

    def linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes())

    def params(self) -> int:
        h = self.hidden
        biases = self.layers * (h + 2 * self.kv_dim)  # Qwen2's q, k, v biases
        norms = self.layers * 2 * h + h
        embeddings = self.vocab * h * (1 if self.tied else 2)
        return self.linear_params() + biases + norms + embeddings

    def layer_params(self) -> int:
        return self.linear_params() // self.layers

    def lora_params(self, r: int) -> int:
        return sum(r * (a + b) for a, b in self.linear_shapes())


# The published configs (config.json of Qwen/Qwen2.5-*-Instruct).
QWEN25 = {
    "0.5B": Architecture("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151_936, tied=True),
    "1.5B": Architecture("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151_936, tied=True),
    "7B": Architecture("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152_064, tied=False),
}
SETUPS = ("qlora_1gpu", "lora_ddp", "full_fsdp2", "full_fsdp2_pre", "full_1gpu_pre")


def activation_bytes_per_token_layer(arch: Architecture, act_bytes: int = 2) -> int:
    """Saved for backward, per token and decoder layer (see the module docstring)."""
    h, kv, i = arch.hidden, arch.kv_dim, arch.intermediate
    return 2 * 4 * h + act_bytes * (5 * h + 3 * kv + 4 * i)


def activations_bytes(arch: Architecture, tokens: int, checkpointing: bool, act_bytes: int = 2) -> int:
    per_layer = activation_bytes_per_token_layer(arch, act_bytes) * tokens
    if not checkpointing:
        return per_layer * arch.layers
    return act_bytes * arch.hidden * tokens * arch.layers + per_layer


def logits_bytes(vocab: int, tokens: int, path: str, autocast_bf16: bool = True, chunk_size: int = CHUNK_SIZE) -> int:
    """Peak of the log-prob computation over `tokens` positions: readable (full logits) or chunked."""
    if path == "readable":
        return tokens * vocab * (16 + (2 if autocast_bf16 else 0))
    if path == "chunked":
        return 2 * min(chunk_size, tokens) * vocab * 4
    raise ValueError(path)


def plan(arch: Architecture, setup: str, pairs: int, max_length: int, gpus: int, lora_r: int) -> dict[str, float]:
    """GiB per GPU for each piece (activations and logits given both ways)."""
    p = arch.params()
    tokens = 2 * pairs * max_length
    n = gpus if setup.startswith("full_fsdp2") else 1
    rows: dict[str, float] = {}
    if setup == "qlora_1gpu":
        linear = arch.linear_params()
        blocks = linear / 64
        rows["weights"] = 0.5 * linear + blocks + 4 * blocks / 256 + 4 * (p - linear)
        trained = arch.lora_params(lora_r)
        rows["weights"] += 4 * trained
    elif setup == "lora_ddp":
        trained = arch.lora_params(lora_r)
        rows["weights"] = 2 * p + 4 * trained
    elif setup == "full_1gpu_pre":
        trained = p
        rows["weights"] = 4 * p + 2 * p  # fp32 weights + autocast's bf16 copies
    else:
        trained = p
        gathered = 2 * (2 * arch.layer_params() + arch.vocab * arch.hidden)  # bf16: 2 layers + the LM head's unit
        rows["weights"] = 4 * p / n + gathered
    rows["gradients"] = 4 * trained / n
    rows["optimizer"] = 8 * trained / n
    rows["reference"] = 2 * p / n if setup == "full_fsdp2" else 0.0
    rows["activations"] = activations_bytes(arch, tokens, checkpointing=False)
    rows["activations, checkpointed"] = activations_bytes(arch, tokens, checkpointing=True)
    rows["logits, readable"] = logits_bytes(arch.vocab, tokens, "readable")
    rows["logits, chunked"] = logits_bytes(arch.vocab, tokens, "chunked")
    state = rows["weights"] + rows["gradients"] + rows["optimizer"] + rows["reference"]
    rows["total, checkpointed + chunked"] = state + rows["activations, checkpointed"] + rows["logits, chunked"]
    rows["total, neither"] = state + rows["activations"] + rows["logits, readable"]
    return {k: v / GiB for k, v in rows.items()}


def table(pairs: int, max_length: int, gpus: int, lora_r: int, models=None) -> str:
    """A markdown table: one row per model and setup, one column per piece (GiB per GPU)."""
    models = models or list(QWEN25)
    pieces = list(plan(QWEN25["0.5B"], "lora_ddp", 1, 8, 1, 1))
    lines = ["| model | setup | " + " | ".join(pieces) + " |", "|---|---|" + "---|" * len(pieces)]
    for name in models:
        for setup in SETUPS:
            row = plan(QWEN25[name], setup, pairs, max_length, gpus, lora_r)
            lines.append(f"| {name} | {setup} | " + " | ".join(f"{row[k]:.2f}" for k in pieces) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per micro-batch (per GPU)")
    parser.add_argument("--max_length", type=int, default=1024, help="tokens per sequence (prompt + completion)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs sharing an FSDP2 model")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank (all linear layers)")
    parser.add_argument("--model", choices=list(QWEN25), action="append", help="(default: all)")
    args = parser.parse_args(argv)
    print(
        f"DPO memory per GPU in GiB: {args.pairs} pairs x {args.max_length} tokens per micro-batch "
        f"({2 * args.pairs * args.max_length} tokens), FSDP2 over {args.gpus} GPUs, LoRA r {args.lora_r} all-linear, "
        "bf16 autocast, AdamW\n"
    )
    print(table(args.pairs, args.max_length, args.gpus, args.lora_r, args.model))


if __name__ == "__main__":
    main()
