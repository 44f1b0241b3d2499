"""Sampling answers from a causal LM, many prompts at once: what `model.generate(do_sample=True)` does, written out.

    prompt rows, left-padded     [[PAD PAD p0 p1 p2]        every row's last prompt token sits in the last column,
                                  [ q0  q1 q2 q3 q4]]       so one forward gives every row's next-token logits
    step 1   the whole prompt through the model (filling the KV cache), logits of the last column -> a token per row
    step 2+  only the newest token per row through the model: the KV cache holds the keys/values of all before it
    a row that has sampled a stop token (EOS) is done: it gets PAD from then on; the loop ends when all rows are done

Each token is drawn from softmax(logits / temperature), restricted to the most likely tokens whose probabilities
reach top_p (nucleus sampling). Given the same random generator state the tokens equal transformers' `generate`
(tests/test_online_dpo.py checks it): the same positions, the same logits processors, one `torch.multinomial` per step.
"""

import inspect

import torch
from transformers import DynamicCache


def new_kv_cache(model) -> dict:
    """A fresh KV cache, as the keyword argument the model's forward takes it (`**new_kv_cache(model)`).

    The cache is made here, once, and the model fills it in place on every forward, so it is never read back from
    the output. transformers renamed the argument (and the output field) from `past_key_values` to `cache` in 5.24;
    the old name still works there but warns on every call, so the name is taken from the forward's signature.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return {name: DynamicCache(config=model.config)}


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits [N, V] with every token outside the nucleus set to -inf: sorted from the least likely up, a token is
    dropped while the probability of it and all less likely tokens stays <= 1 - top_p (the most likely token always
    stays). transformers' TopPLogitsWarper, boundary included."""
    sorted_logits, order = torch.sort(logits, descending=False)
    drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    drop_sorted[:, -1] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def sample_completions(
    model, prompt_ids, prompt_mask, *, max_new_tokens, temperature, top_p, stop_ids, pad_id, generator, to_the_end
) -> torch.Tensor:
    """Sampled answers [N, ≤ max_new_tokens] to left-padded prompts (prompt_ids, prompt_mask [N, P]): each row's
    tokens up to and including its first stop token (`stop_ids`, a tensor), then `pad_id`.

    `generator` draws every token. `to_the_end`: run all max_new_tokens steps even when every row is done — under
    FSDP/ZeRO-3 each forward gathers the sharded weights from all processes, so they must all run the same number.
    """
    input_ids, attention_mask = prompt_ids, prompt_mask
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens: padding is invisible
    kv_cache = new_kv_cache(model)
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1, **kv_cache)  # fmt: skip
        logits = out.logits[:, -1].float() / temperature
        probs = torch.softmax(top_p_filter(logits, top_p) if top_p < 1 else logits, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token = torch.where(done, pad_id, token)
        tokens.append(token)
        done |= torch.isin(token, stop_ids)
        if done.all() and not to_the_end:
            break
        input_ids = token[:, None]
        attention_mask = torch.cat([attention_mask, torch.ones_like(input_ids)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return torch.stack(tokens, dim=1)
