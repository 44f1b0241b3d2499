"""The offline demo: a tiny world (`world.py`), its tokenizer (`make_tokenizer.py`) and a tiny model preset.

On a 2-core CPU in minutes: pretrain a few-million-parameter Qwen2 from scratch on Little World / 小小世界, teach
it to chat (SFT: every question answered both politely and bluntly), then shift it with DPO (polite preferred)
and watch the share of polite answers on held-out questions go up.

    from nanodpo.demo import TOKENIZER_DIR, tiny_model_config
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)       # shipped in nanodpo/assets/tokenizer/
    model = Qwen2ForCausalLM(tiny_model_config(len(tokenizer)))    # random init, ~3.5M parameters
"""

from pathlib import Path

from transformers import Qwen2Config

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"

# Special token ids of the shipped tokenizer (make_tokenizer.SPECIAL_TOKENS, in this order).
PAD_TOKEN_ID = 0  # <|endoftext|>
IM_START_TOKEN_ID = 1  # <|im_start|>
EOS_TOKEN_ID = 2  # <|im_end|>

# A Qwen2 small enough to train on a CPU in minutes: with the demo tokenizer's ~1,200 tokens, ~3.5M parameters (0.3M
# of them the embedding, tied to the output layer); about 1k tokens/s of training per CPU core at sequence length 256.
# head_dim = 256 / 4 = 64; 2 key/value heads (grouped-query attention, as in Qwen2).
TINY_MODEL_PRESET = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=PAD_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
    bos_token_id=None,
)


def tiny_model_config(vocab_size: int, **overrides):
    """A `transformers.Qwen2Config` of TINY_MODEL_PRESET with this vocabulary (and any field overridden)."""
    return Qwen2Config(**{**TINY_MODEL_PRESET, "vocab_size": vocab_size, **overrides})
