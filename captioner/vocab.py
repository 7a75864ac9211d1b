"""Tokenizer and vocabulary.

Tokenisation uses nltk's Treebank-style word tokenizer with `preserve_line=True`, which needs no
downloaded nltk data (plain `word_tokenize` wants the punkt model, which is not available offline).
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Sequence

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)

# Most captions are plain words, single commas and at most a final period. On those the Treebank
# rules only set the commas and the final period apart (both then dropped as punctuation), except
# for the few words it splits without an apostrophe ("cannot" -> "can not"), so splitting on
# spaces, commas and the period gives the same tokens ~10x faster (checked against nltk in
# tests/test_vocab.py). It matters at COCO scale: 566k captions, tokenized for the vocabulary and
# again for the ids. (",," is left to nltk: its comma rule leaves the second comma on the word.)
PLAIN_CAPTION = re.compile(r"(?!.*,,)[a-z ,]*[a-z][a-z ,]*\.?[ \t\r\n]*")
SPLIT_BY_TREEBANK = frozenset({"cannot", "gimme", "gonna", "gotta", "lemme", "wanna"})


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation-only tokens are dropped (captions end in ' .')."""
    text = text.lower()
    if PLAIN_CAPTION.fullmatch(text):
        words = text.replace(",", " ").replace(".", " ").split()
        if SPLIT_BY_TREEBANK.isdisjoint(words):
            return words
    from nltk.tokenize import word_tokenize   # here, not at the top: importing nltk takes ~1.5 s

    tokens = word_tokenize(text, preserve_line=True)
    return [t for t in tokens if any(ch.isalnum() for ch in t)]


@functools.lru_cache(maxsize=1)
def _detokenizer():
    from nltk.tokenize.treebank import TreebankWordDetokenizer   # ~1.5 s to import: once, on use

    return TreebankWordDetokenizer()


def detokenize(words: Sequence[str]) -> str:
    """Tokens -> plain English, the inverse of tokenize: ["a", "man", "'s", "shirt"] -> "a man's
    shirt", ["does", "n't"] -> "doesn't". Every caption shown or written goes through here; the
    PTB tokenizer of the metrics splits them again, so scores do not change."""
    return _detokenizer().detokenize(list(words))


class Vocabulary:
    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        self.itos: list[str] = list(words)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.stoi[t] for t in SPECIAL_TOKENS)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> "Vocabulary":
        """Keep words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        return cls(list(SPECIAL_TOKENS)).extended(captions, min_count)

    def extended(self, captions: Iterable[str], min_count: int = 5) -> "Vocabulary":
        """This vocabulary, every word keeping its id, followed by the captions' words seen at
        least `min_count` times that it lacks (most frequent first, ties alphabetical)."""
        counts = Counter(tok for caption in captions for tok in tokenize(caption))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return Vocabulary(self.itos + [w for w in kept if w not in self.stoi])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str, max_len: int | None = None) -> list[int]:
        """<start> w1 .. wn <end>, unknown words as <unk>, at most max_len words."""
        words = tokenize(caption)[:max_len]
        return [self.bos_id] + [self.stoi.get(w, self.unk_id) for w in words] + [self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Plain-English text of the words up to the first <end>, specials dropped."""
        return detokenize(self.words(ids))

    @staticmethod
    def detokenize(words: Sequence[str]) -> str:
        return detokenize(words)

    def words(self, ids: Iterable[int]) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.itos[i])
        return out

    def to_list(self) -> list[str]:
        return list(self.itos)
