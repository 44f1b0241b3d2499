"""The offline demo: a tiny world (`world.py`), its tokenizer (`make_tokenizer.py`) and a tiny model preset.

On a 2-core CPU in minutes: pretrain a few-million-parameter Qwen2 from scratch on Little World / 小小世界, teach
it to chat (SFT: every question answered both politely and bluntly), then shift it with DPO (polite preferred)
and watch the share of polite answers on held-out questions go up.

    from nanodpo.demo import TOKENIZER_DIR, tiny_model_config
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)       # shipped in nanodpo/assets/tokenizer/
    model = Qwen2ForCausalLM(tiny_model_config(len(tokenizer)))    # random init, ~3.5M parameters
"""

from nanodpo.model import (  # the preset lives with the model loader, which knows it by name (--model nanodpo-tiny)
    EOS_TOKEN_ID,
    IM_START_TOKEN_ID,
    PAD_TOKEN_ID,
    TINY_MODEL_PRESET,
    TOKENIZER_DIR,
    tiny_model_config,
)

__all__ = [
    "EOS_TOKEN_ID", "IM_START_TOKEN_ID", "PAD_TOKEN_ID", "TINY_MODEL_PRESET", "TOKENIZER_DIR", "tiny_model_config",
]  # fmt: skip
