"""The CLIP tokenizer: identical ids to open_clip's and OpenAI's SimpleTokenizer (the independent oracles),
packing, truncation, decoding, special tokens written in text, vocab-file discovery and errors.

The oracles are the originals' `tokenizer.py` / `simple_tokenizer.py`, loaded by file path (importing
the packages needs torchvision, which is not a dependency): the README's test setup installs them with
`pip install --no-deps open-clip-torch clip-anytorch`.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch

from fastclip import tokenizer as tk
from fastclip.tokenizer import ClipTokenizer


def _load_original(package: str, file: str):
    """The SimpleTokenizer of an installed original, loaded from its file (no package import)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.fail(
            f"the reference tokenizer {package!r} is not installed: pip install --no-deps open-clip-torch clip-anytorch"
        )
    path = Path(spec.submodule_search_locations[0]) / file
    module_spec = importlib.util.spec_from_file_location(f"_{package}_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    module_spec.loader.exec_module(module)  # open_clip sets TOKENIZERS_PARALLELISM as an import side effect: undo it
    if saved is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = saved
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def oracle():
    return _load_original("open_clip", "tokenizer.py")


@pytest.fixture(scope="module")
def openai_oracle():
    return _load_original("clip", "simple_tokenizer.py")


@pytest.fixture(scope="module")
def tok(oracle) -> ClipTokenizer:
    return ClipTokenizer()


LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
CORPUS = [
    # plain captions, case
    "a photo of a cat.",
    "A PHOTO OF A CAT.",
    "Two dogs playing in the snow, 2019",
    LONG_TEXT,
    # empty and whitespace-only
    "",
    " ",
    "\n\t  \r\n",
    "\u3000",
    "\xa0",
    "\u2028\u2029\x85",
    "\x1c\x1d\x1e\x1f",
    # contractions (also curly apostrophes, which ftfy straightens)
    "it's",
    "IT'S",
    "they're we've I'm you'll he'd don't",
    "'s 't 're 've 'm 'll 'd",
    "''s",
    "rock'n'roll",
    "it\u2019s \u201cquoted\u201d",
    "'S 'T 'RE",
    # numbers and punctuation runs
    "12345",
    "3.14159",
    "1,000,000",
    "2nd 3rd 4th",
    "\u0663\u0664\u0665",
    "\xbd \xb2 \u2167",
    "!!!???...",
    "--->",
    "(hello) [world] {foo}",
    "@#$%^*",
    "...hello...",
    "a/b\\c",
    "~`|",
    "#hashtag @mention",
    "https://example.com/path?q=1&x=2",
    "user@example.com",
    # HTML entities (ftfy unescapes unless the text has '<'; then html.unescape runs twice)
    "&amp; &lt;b&gt; &quot;quoted&quot; &#39;apos&#39; &#x1F600;",
    "&amp;amp;amp;",
    "<b>bold</b> &amp;amp; more",
    "Tom &amp Jerry",
    "&AMP; &NBSP;x",
    "a\n<i>\n&amp;amp;",
    # mojibake that ftfy fixes
    "\xe2\x9c\x94 No problems",
    "The Mona Lisa doesn\xc3\xa2\xe2\x82\xac\xe2\x84\xa2t have eyebrows.",
    "s\xc3\xb3",
    "caf\xc3\xa9",
    "\xc3\xa0 la carte",
    "\xe3\x83\xa1\xe3\x82\xa4\xe3\x83\x89",
    # accents (composed and decomposed), ligatures, widths, controls, escapes, surrogates
    "caf\xe9 na\xefve r\xe9sum\xe9 \xc5ngstr\xf6m",
    "Cr\xe8me Br\xfbl\xe9e",
    "cafe\u0301",
    "\ufb01ne \ufb02ower",
    "\uff2c\uff2f\uff35\uff24\u3000\uff2e\uff2f\uff29\uff33\uff25\uff33",
    "\uff76\uff80\uff76\uff85",
    "\uff28\uff45\uff4c\uff4c\uff4f123\uff14\uff15\uff16",
    "a\x00b\x07c\x0bd\x0ce\x1bf\x7fg",
    "\x1b[31mred\x1b[0m",
    "\x80\x93\x9f",
    "\ud83d\ude00 pair",
    "\ud800 lone",
    "zero\u200bwidth",
    "soft\xadhyphen",
    "bidi \u202e x",
    # CJK, emoji, other scripts
    "\u6771\u4eac\u306e\u732b",
    "\u4e00\u53ea\u732b\u5750\u5728\u6c99\u53d1\u4e0a",
    "\uace0\uc591\uc774 \uc0ac\uc9c4",
    "\U0001f600\U0001f431\U0001f44d\U0001f3fd",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467 family",
    "\U0001f1fa\U0001f1f8 flag",
    "\u2764\ufe0f",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
    "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5",
    "\u0645\u0631\u062d\u0628\u0627",
    "\u05e9\u05dc\u05d5\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947",
    "\u0e44\u0e17\u0e22",
    "\U00020000\U0002a6d6 \U0001d400",
    # case-mapping and case-folding corners: lower() growing a string, IGNORECASE folding ſ to s
    "\u0130stanbul",
    "\u01c5 \u01c6",
    "\xdf stra\xdfe",
    "\u017ftart",
    "'\u017f",
    "<\u017ftart_of_text>",
    "\u212a",
    # the special tokens written in the text, as words and not
    "<start_of_text>",
    "hello <end_of_text> world",
    "<START_OF_TEXT>",
    "x<start_of_text>y",
    "'<start_of_text>",
    "<<end_of_text>>",
    "a</w>b",
    # very long words
    "a" * 300,
    "supercalifragilisticexpialidocious" * 10,
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "\u732b" * 100,
    "\U0001f600" * 40,
]


def test_vocab_matches_original(tok, oracle):
    assert tok.vocab_size == len(oracle.encoder) == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    assert tok.encoder == oracle.encoder
    assert tok.bpe_ranks == oracle.bpe_ranks


@pytest.mark.parametrize(
    "text, ids",
    [
        ("a photo of a cat.", [320, 1125, 539, 320, 2368, 269]),
        ("Hello, World!", [3306, 267, 1002, 256]),
        ("it's a dog's life", [585, 568, 320, 1929, 568, 970]),
        ("1,000", [272, 267, 271, 271, 271]),
        ("&amp; caf\xe9", [261, 15304]),
        ("\u6771\u4eac", [48338, 21078, 361]),
        ("\U0001f600", [7334]),
        ("<start_of_text>", [49406]),
        ("", []),
    ],
)
def test_known_ids(tok, oracle, text, ids):
    assert tok.encode(text) == ids == oracle.encode(text)


def test_corpus_ids_match_original(tok, oracle):
    for text in CORPUS:
        assert tok.encode(text) == oracle.encode(text), f"ids differ for {text!r}"
    for length in (77, 16, 2):
        assert torch.equal(tok(CORPUS, context_length=length), oracle(CORPUS, context_length=length)), length


SPECIAL_SPELLINGS = [
    "<|startoftext|> <|endoftext|>",
    "<|startoftext|>",
    "a photo<|endoftext|> of",
    "<|ENDOFTEXT|> x",
    "<start_of_text> hi <end_of_text>",
    "x<|endoftext|>y",
    "<|startoftext|><|endoftext|>",
    "<|endoftext|",
]


def test_specials_in_text_follow_each_original(tok, oracle, openai_oracle):
    """open_clip's spelling by default, OpenAI's on request; the rest of the text is tokenized identically."""
    openai_style = ClipTokenizer(specials_in_text="openai")
    for text in SPECIAL_SPELLINGS + CORPUS:
        assert tok.encode(text) == oracle.encode(text), f"open_clip ids differ for {text!r}"
        assert openai_style.encode(text) == openai_oracle.encode(text), f"OpenAI ids differ for {text!r}"
    assert openai_style.encode("<|startoftext|> <|endoftext|>") == [49406, 49407]
    assert tok.encode("<start_of_text> <end_of_text>") == [49406, 49407]


def test_specials_in_text_none_never_emits_special_ids(tok):
    safe = ClipTokenizer(specials_in_text="none")
    for text in SPECIAL_SPELLINGS + CORPUS:
        ids = safe.encode(text)
        assert tok.sot_token_id not in ids and tok.eot_token_id not in ids, text
        if "_of_text>" not in text.lower():  # without a special word it is the default tokenization
            assert ids == tok.encode(text), text
    row = safe(["<end_of_text> a cat"])[0]  # the only end token is the real one, after the caption
    assert (row == tok.eot_token_id).sum() == 1 and row[0] == tok.sot_token_id
    assert pickle.loads(pickle.dumps(safe)).encode("<end_of_text>") == safe.encode("<end_of_text>")


def test_specials_in_text_rejects_unknown_convention():
    with pytest.raises(ValueError, match="specials_in_text must be one of"):
        ClipTokenizer(specials_in_text="hf")


def _random_texts(seed: int, count: int, alphabet: str, max_len: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randint(0, max_len))) for _ in range(count)]


def test_ascii_fuzz_matches_original(tok, oracle):
    """Every ASCII character, including controls and '&' (the ftfy-skipping fast path's boundary)."""
    alphabet = "".join(map(chr, range(128))) + "     aaeeiosst'&;#" * 3
    for text in _random_texts(0, 1500, alphabet, 30) + [chr(c) for c in range(128)]:
        assert tok.encode(text) == oracle.encode(text), f"ids differ for {text!r}"


def test_unicode_fuzz_matches_original(tok, oracle):
    rng = random.Random(1)
    fragments = [t for t in CORPUS if len(t) < 40] + ["&amp;", "&lt;", "&#233;", "\xc3", "\xa9", "'s", " ", "\n"]
    fragments += [chr(rng.randrange(0x80, 0x30000)) for _ in range(300)]  # any plane; lone surrogates too
    texts = ["".join(rng.choices(fragments, k=rng.randint(1, 6))) for _ in range(800)]
    for text in texts:
        assert tok.encode(text) == oracle.encode(text), f"ids differ for {text!r}"
    assert torch.equal(tok(texts, context_length=10), oracle(texts, context_length=10))


def test_captions_batch_matches_original(tok, oracle):
    words = "a the photo of cat dog on red car 2 3.5 it's they're caf\xe9 \u6771\u4eac \U0001f600 , . ! &amp;".split()
    rng = random.Random(2)
    texts = [" ".join(rng.choices(words, k=rng.randint(0, 90))) for _ in range(300)]
    assert torch.equal(tok(texts), oracle(texts))


def test_output_shape_dtype_padding(tok):
    out = tok(["a photo of a cat.", ""])
    assert out.dtype == torch.long and out.shape == (2, 77)
    assert out[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert out[1, :2].tolist() == [49406, 49407]
    assert not out[0, 8:].any() and not out[1, 2:].any()
    assert torch.equal(tok("a photo of a cat."), out[:1])  # a single string is a batch of one
    assert torch.equal(tok(("a photo of a cat.",)), out[:1])  # any sequence of str
    assert tok([]).shape == (0, 77)
    assert tok(["a cat"], context_length=5).shape == (1, 5)
    assert ClipTokenizer(context_length=12)("a cat").shape == (1, 12)


def test_truncation_keeps_end_token_last(tok):
    ids = tok.encode(LONG_TEXT)
    assert len(ids) > 75
    out = tok(LONG_TEXT)[0].tolist()
    assert out == [49406, *ids[:75], 49407]
    assert tok(LONG_TEXT, context_length=2)[0].tolist() == [49406, 49407]
    exact = " ".join(["cat"] * 75)  # exactly fills 77: no truncation, no padding
    assert tok(exact)[0].tolist() == [49406, *[2368] * 75, 49407]


def test_decode_round_trip(tok, oracle):
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids) == oracle.decode(ids), f"decode differs for {text!r}"
    for text in ["a photo of a cat.", "Caf\xe9 in \u6771\u4eac \U0001f600", "  it's   2 dogs!  "]:
        decoded = tok.decode(tok.encode(text))
        assert decoded.split() != [] and "".join(decoded.split()) == "".join(tk.clean_text(text).split())
    assert tok.decode(tok.encode("a photo of a cat.")) == "a photo of a cat . "
    assert tok.decode(tok("a cat")[0, :4]) == "<start_of_text>a cat <end_of_text>"  # tensors work too


def test_bounded_cache_and_pickle(tok, oracle):
    small = ClipTokenizer(cache_size=8)
    texts = [f"word{i} {i}x{i}" for i in range(50)]
    assert [small.encode(t) for t in texts] == [oracle.encode(t) for t in texts]
    assert len(small._chunks) <= 8 and len(small._words) <= 8
    clone = pickle.loads(pickle.dumps(tok))
    assert len(pickle.dumps(tok)) < 1000  # workers reload the vocab instead of receiving it
    assert torch.equal(clone(CORPUS), tok(CORPUS))


def test_tokenize_function(tok):
    assert torch.equal(tk.tokenize(["a photo of a cat."]), tok(["a photo of a cat."]))
    assert tk.tokenize("a cat", context_length=4).shape == (1, 4)


@pytest.mark.parametrize("length", [1, 0, -5])
def test_context_length_too_small(tok, length):
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        tok("a cat", context_length=length)


def test_bad_inputs(tok):
    for bad in (5, None, b"a cat", {"a": 1}, (t for t in ["a"])):
        with pytest.raises(TypeError, match="texts must be a str or a list of str"):
            tok(bad)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        tok(["a cat", 3])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(None)
    for bad in (7.0, "77", True):
        with pytest.raises(TypeError, match="context_length must be an int"):
            tok("a cat", context_length=bad)
    with pytest.raises(ValueError, match=r"ids must be ints in \[0, 49408\)"):
        tok.decode([320, 49408])


def test_packaged_vocab_is_the_default(monkeypatch):
    """After `pip install` the tokenizer needs no other package or download: the merges file ships inside."""
    monkeypatch.delenv(tk.VOCAB_ENV, raising=False)
    assert tk.find_vocab_file() == tk.PACKAGED_VOCAB
    assert tk.PACKAGED_VOCAB.is_relative_to(Path(tk.__file__).parent)
    assert (tk.PACKAGED_VOCAB.parent / "LICENSE").is_file()


def test_broken_install_without_vocab_says_so(monkeypatch, tmp_path):
    monkeypatch.delenv(tk.VOCAB_ENV, raising=False)
    monkeypatch.setattr(tk, "PACKAGED_VOCAB", tmp_path / tk.VOCAB_FILE)
    with pytest.raises(FileNotFoundError) as err:
        ClipTokenizer()
    for expected in ("missing from this fastclip install", "reinstall fastclip", "FASTCLIP_BPE_PATH"):
        assert expected in str(err.value)


def test_vocab_found_from_argument_and_env(tok, tmp_path, monkeypatch):
    copy = tmp_path / "my_vocab.txt.gz"
    shutil.copy(tok.bpe_path, copy)
    assert ClipTokenizer(bpe_path=copy).bpe_path == copy
    monkeypatch.setenv(tk.VOCAB_ENV, str(copy))
    found = ClipTokenizer()
    assert found.bpe_path == copy and found.encode("a photo of a cat.") == tok.encode("a photo of a cat.")


def test_named_vocab_path_must_exist(tmp_path, monkeypatch):
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(FileNotFoundError, match="bpe_path argument"):
        ClipTokenizer(bpe_path=missing)
    monkeypatch.setenv(tk.VOCAB_ENV, str(missing))  # a wrong env var is an error, not a silent fallback
    with pytest.raises(FileNotFoundError, match="FASTCLIP_BPE_PATH"):
        ClipTokenizer()


def test_not_a_vocab_file(tmp_path):
    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wt") as f:
        f.write("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="not CLIP's BPE merges file"):
        ClipTokenizer(bpe_path=bad)
