"""Tokenizer and vocabulary: offline nltk, frequency threshold, specials, encode/decode, JSON."""
import json

import nltk
import pytest

from captioner.vocab import SPECIAL_TOKENS, Vocabulary, tokenize

CAPTIONS = [
    "A dog runs on the grass .",
    "A brown dog is running, fast!",
    "Two dogs play in the snow.",
    "A dog and a cat.",
]


def test_tokenize_needs_no_nltk_data(monkeypatch, tmp_path):
    # An empty data path: plain word_tokenize would raise LookupError (no punkt model).
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    assert tokenize("A Brown DOG, running fast!  On the grass .") == [
        "a", "brown", "dog", "running", "fast", "on", "the", "grass"]


def test_tokenize_keeps_words_with_punctuation_inside():
    assert tokenize("The dog's ball isn't red-and-white.") == [
        "the", "dog", "'s", "ball", "is", "n't", "red-and-white"]
    assert tokenize(" . , ! ") == []


def test_min_count_threshold_and_order():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    # a x5, dog x3, the x2; everything seen once is dropped
    assert vocab.itos == list(SPECIAL_TOKENS) + ["a", "dog", "the"]
    assert len(Vocabulary.build(CAPTIONS, min_count=1)) == len(SPECIAL_TOKENS) + len(
        {w for c in CAPTIONS for w in tokenize(c)})
    assert Vocabulary.build(CAPTIONS, min_count=100).itos == list(SPECIAL_TOKENS)


def test_specials_come_first():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    assert vocab.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2, 3)


def test_encode_decode_round_trip():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    ids = vocab.encode("A brown dog is running in the snow .")
    assert ids == [vocab.bos_id] + [vocab.stoi[w] for w in
                                    ["a", "brown", "dog", "is", "running", "in", "the", "snow"]
                                    ] + [vocab.eos_id]
    for caption in CAPTIONS:
        assert vocab.decode(vocab.encode(caption)) == " ".join(tokenize(caption))


def test_unknown_words_become_unk():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    ids = vocab.encode("A zebra eats the dog")
    assert ids == [vocab.bos_id, vocab.stoi["a"], vocab.unk_id, vocab.unk_id, vocab.stoi["the"],
                   vocab.stoi["dog"], vocab.eos_id]
    assert vocab.decode(ids) == "a <unk> <unk> the dog"


def test_encode_truncates_to_max_len():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    ids = vocab.encode("a dog runs on the grass", max_len=3)
    assert vocab.words(ids) == ["a", "dog", "runs"]
    assert ids[-1] == vocab.eos_id and len(ids) == 5


def test_decode_stops_at_end_and_drops_pad_and_start():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    a, dog = vocab.stoi["a"], vocab.stoi["dog"]
    assert vocab.decode([vocab.bos_id, a, vocab.pad_id, dog, vocab.eos_id, a, a]) == "a dog"
    assert vocab.decode([]) == ""


def test_json_list_round_trip():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    restored = Vocabulary(json.loads(json.dumps(vocab.to_list())))
    assert restored.itos == vocab.itos
    assert restored.stoi == vocab.stoi
    for caption in CAPTIONS:
        assert restored.encode(caption) == vocab.encode(caption)


@pytest.mark.parametrize("words, message", [
    (["a", "<pad>", "<start>", "<end>", "<unk>"], "must start with"),
    (list(SPECIAL_TOKENS) + ["dog", "dog"], "duplicate"),
])
def test_invalid_word_lists_are_rejected(words, message):
    with pytest.raises(ValueError, match=message):
        Vocabulary(words)


def test_captions_are_plain_english():
    from captioner.vocab import detokenize

    assert detokenize(["a", "man", "'s", "shirt"]) == "a man's shirt"
    assert detokenize(["the", "dog", "does", "n't", "swim"]) == "the dog doesn't swim"
    assert detokenize(tokenize("Two dogs' toys, a girl's hat.")) == "two dogs toys a girl's hat"
    assert detokenize([]) == ""


def nltk_tokens(text: str) -> list[str]:
    from nltk.tokenize import word_tokenize
    return [t for t in word_tokenize(text.lower(), preserve_line=True) if any(ch.isalnum() for ch in t)]


def test_plain_caption_shortcut_gives_the_treebank_tokens():
    """tokenize() skips nltk for plain captions (letters, spaces, commas, a final period): the
    tokens must be nltk's, on the fixture captions and on random strings of exactly the
    characters the shortcut takes, with the words the Treebank rules split ("cannot")."""
    import random
    from pathlib import Path

    from captioner.vocab import PLAIN_CAPTION

    fixtures = Path(__file__).with_name("fixtures")
    texts = [line.split("\t", 1)[1] for line in
             (fixtures / "flickr8k_tiny" / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
             if "\t" in line]
    rng = random.Random(0)
    pieces = ["a", "b", "n", "ot", " ", " ", ",", ",", ".", " .", "\t", "cannot", "gonna", "wanna",
              "gimme", "lemme", "gotta", "A", "é", "'s", "-"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 10))) for _ in range(3000)]
    plain = [t for t in texts if PLAIN_CAPTION.fullmatch(t.lower())]
    assert len(plain) > 500                        # the shortcut is really taken, often
    assert [tokenize(t) for t in texts] == [nltk_tokens(t) for t in texts]


def test_extended_keeps_every_id_and_appends_the_new_frequent_words():
    old = Vocabulary.build(["a dog runs", "a dog sits"], min_count=1)
    new = old.extended(["a giraffe eats", "a giraffe runs", "one zebra"], min_count=2)
    assert new.itos == old.itos + ["giraffe"]
    assert old.extended([], min_count=1).itos == old.itos
    assert Vocabulary.build(["b a", "a"], min_count=1).itos[4:] == ["a", "b"]
