"""Word-level tokenizers saved in transformers' format.

The small models the project trains itself (Shapes World: a closed vocabulary of a
few dozen words) use one token per word, so a caption is short and every token
means something. They load back with `AutoTokenizer.from_pretrained` like any other.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = (PAD, UNK, BOS, EOS)


def word_level_tokenizer(words: Iterable[str], *, add_bos: bool, add_eos: bool,
                         model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ids 0-3 are <pad> <unk> <s> </s>, then `words` in order."""
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    single = " ".join(([BOS] if add_bos else []) + ["$A"] + ([EOS] if add_eos else []))
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                   eos_token=EOS, model_max_length=model_max_length)


def load_tokenizer(folder) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder, keeping a plain `tokenizers` model as it was saved.

    AutoTokenizer picks the class from the model's config.json when one sits beside
    the tokenizer (a Qwen2 config gives Qwen2Tokenizer), which rebuilds a word-level
    vocabulary as BPE; a folder saved from a bare tokenizers object is loaded as such.
    """
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    cfg_path = Path(folder) / "tokenizer_config.json"
    cls_name = json.loads(cfg_path.read_text()).get("tokenizer_class") if cfg_path.is_file() else None
    if cls_name in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)
