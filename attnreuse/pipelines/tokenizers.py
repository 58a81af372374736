"""Tokenizers written locally from a word list (CLIP's BPE, a word-level T5), for the default models and the tiny
pipelines: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write

__all__ = ["write_clip_tokenizer", "write_t5_tokenizer"]


def _bpe_merges(words) -> tuple[list[tuple[str, str]], list[str]]:
    """Byte-pair merges learnt on the word list until every word is one token, and the resulting symbols: CLIP's
    tokenizer splits a word into characters and applies merges by rank."""
    from collections import Counter

    segments = {w: [*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(words)}
    symbols = list(dict.fromkeys(sym for seg in segments.values() for sym in seg))
    merges = []
    while any(len(seg) > 1 for seg in segments.values()):
        pairs = Counter(pair for seg in segments.values() for pair in zip(seg, seg[1:]))
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        symbols.append("".join(best))
        segments = {word: _merged(seg, best) for word, seg in segments.items()}
    return merges, list(dict.fromkeys(symbols))


def _merged(seg: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(seg):
        if i + 1 < len(seg) and (seg[i], seg[i + 1]) == pair:
            out.append(seg[i] + seg[i + 1])
            i += 2
        else:
            out.append(seg[i])
            i += 1
    return out


def write_clip_tokenizer(directory, words, max_length: int = 77):
    """Write a word-level CLIP tokenizer (vocab.json and the merges.txt that makes each word one token), load it."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = [w.lower() for w in words]
    merges, symbols = _bpe_merges(words)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    atomic_write(directory / "vocab.json", lambda tmp: tmp.write_text(json.dumps(vocab)))
    atomic_write(directory / "merges.txt", lambda tmp: tmp.write_text(merges_text))
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                              model_max_length=max_length, pad_token="<|endoftext|>")
    broken = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if broken:
        raise RuntimeError(f"attnreuse: the written tokenizer splits {broken[:5]}; this is a bug.")
    return tokenizer


def write_t5_tokenizer(directory, words, max_length: int = 120):
    """Write a word-level tokenizer with T5's special tokens (pad 0, eos 1, unk 2; eos appended), save and return it:
    what T5-conditioned pipelines (PixArt, SD3, Flux) call, made locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=max_length)
    tokenizer.save_pretrained(str(directory))
    return tokenizer
