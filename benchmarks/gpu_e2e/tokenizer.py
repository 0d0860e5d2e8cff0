"""The run's word-level vocabulary: token strings and ids, and the ``tokenizer.json`` every model folder gets.

Prompts go to LMDeploy as token ids. The tokenizer is there because LMDeploy's pipeline and server need one (to
detokenize, and to name tokens in log-probabilities); the server client maps those names back to ids.
"""

from __future__ import annotations

import json
import pathlib
import re

PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def token_string(i: int) -> str:
    """The vocabulary's token ``i``: three specials, then ``t3 .. t{V-1}`` (one word per token)."""
    return SPECIAL_TOKENS[i] if i < len(SPECIAL_TOKENS) else f"t{i}"


def token_id(token: str) -> int:
    if token in SPECIAL_TOKENS:
        return SPECIAL_TOKENS.index(token)
    if not re.fullmatch(r"t\d+", token):
        raise ValueError(f"not a token of this vocabulary: {token!r}")
    return int(token[1:])


def write_tokenizer(out: pathlib.Path, vocab: int) -> None:
    """A word-level ``tokenizer.json`` (one whitespace-separated word per token, nothing added) + its config.

    LMDeploy's pipeline and server need a tokenizer (to detokenize, and to name tokens in log-probabilities);
    prompts are sent as token ids. ``tokenizers`` alone encodes ``"t5 t17"`` as ``[5, 17]``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({token_string(i): i for i in range(vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "pad_token": "<pad>", "unk_token": "<pad>", "model_max_length": 4096, "add_bos_token": False,
           "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<pad>"}, indent=2) + "\n")
