"""CLIP's byte-level BPE tokenizer, id-for-id identical to OpenAI's / open_clip's `SimpleTokenizer`.

49408 tokens: 256 byte symbols, their `</w>` (end-of-word) variants, 48894 merges, then the start (49406)
and end (49407) of text. Text is cleaned as the original does it (ftfy, HTML unescaped twice, whitespace
collapsed, lower-cased), split by the original's regex and BPE-merged word by word. The merges file,
OpenAI's `bpe_simple_vocab_16e6.txt.gz`, ships inside fastclip (`fastclip/vocab/`, with its licence).

Special tokens written in the text: open_clip (the default) turns the words `<start_of_text>` and
`<end_of_text>` into the special ids and splits OpenAI's spelling `<|startoftext|>` into ordinary tokens;
OpenAI's tokenizer (and transformers' `CLIPTokenizer`) does the opposite. `specials_in_text="openai"`
gives OpenAI's behaviour, and `"none"` never makes a special id from text, which is the safe choice for
untrusted captions (text that spells a special token cannot end a caption early).

Why it is fast (the original spends ~130 us per caption, half of it in ftfy):
- on printable ASCII without '&', ftfy can change nothing but line breaks, which cleaning collapses
  anyway (each of its other fixes needs a non-ASCII character, a control character or an HTML
  entity), so such text skips it; ftfy still runs, exactly as in the original, on all other text;
- cleaned text is cut at spaces into chunks ("cat.", "it's") and a bounded cache maps each chunk to its
  ids, so a known chunk costs one dict lookup: no regex, byte mapping or BPE (the original caches
  only the BPE step, and without bound);
- new chunks are split with an equivalent stdlib `re` pattern when ASCII (3x faster than `regex`);
- a batch is packed into the padded tensor with one vectorised numpy assignment.
HuggingFace `tokenizers` was measured as the engine and was slower here (benchmarks/bench_tokenizer.py).
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import regex
import torch

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
PACKAGED_VOCAB = Path(__file__).resolve().parent / "vocab" / VOCAB_FILE
VOCAB_ENV = "FASTCLIP_BPE_PATH"
NUM_MERGES = 49152 - 256 - 2  # 48894: the original reads merge lines 1..48894 of a longer file
SOT, EOT = "<start_of_text>", "<end_of_text>"  # the vocabulary's names of the two special tokens
DEFAULT_CONTEXT_LENGTH = 77
# How each convention spells the special tokens in text ("none": text never yields a special id).
SPECIALS_IN_TEXT = {"open_clip": (SOT, EOT), "openai": ("<|startoftext|>", "<|endoftext|>"), "none": ()}

# The original's pre-tokeniser (with IGNORECASE, which matters for e.g. "'ſ": ſ folds to s), and the same
# split on cleaned ASCII text, which is lower-case already and whose only whitespace is ' '; each led by
# the alternatives for the special words of a convention.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_ASCII_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+"""
# Anything outside printable ASCII + \t\n\r, or '&' (HTML), can be changed by ftfy + html.unescape.
_NEEDS_FTFY = re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")


@functools.cache
def _word_res(specials_in_text: str) -> tuple[regex.Pattern, re.Pattern]:
    """(full pattern, ASCII pattern) for one convention of special words."""
    lead = "".join(re.escape(word) + "|" for word in SPECIALS_IN_TEXT[specials_in_text])
    return regex.compile(lead + _WORD_PATTERN, regex.I), re.compile(lead + _ASCII_WORD_PATTERN)


def find_vocab_file(path: str | os.PathLike | None = None) -> Path:
    """The BPE merges file: `path`, else $FASTCLIP_BPE_PATH, else the one fastclip ships."""
    for given, origin in ((path, "the bpe_path argument"), (os.environ.get(VOCAB_ENV), f"${VOCAB_ENV}")):
        if given:  # a location the user named must exist: never silently fall back to another file
            if not Path(given).is_file():
                raise FileNotFoundError(f"CLIP BPE vocab file not found at {given!r} (from {origin})")
            return Path(given)
    if not PACKAGED_VOCAB.is_file():  # only a broken install lacks it
        raise FileNotFoundError(
            f"CLIP BPE vocab file {VOCAB_FILE} is missing from this fastclip install (expected {PACKAGED_VOCAB}); "
            f"reinstall fastclip, or pass bpe_path= / set ${VOCAB_ENV}."
        )
    return PACKAGED_VOCAB


def _fix_text(text: str) -> str:
    """ftfy.fix_text, imported on first use: fastclip imports and tokenizes ASCII captions without ftfy."""
    try:
        import ftfy
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "fastclip's tokenizer needs the package 'ftfy' to clean text with non-ASCII characters or HTML "
            "entities, as CLIP's original tokenizer does: pip install ftfy"
        ) from error
    return ftfy.fix_text(text)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (whitespace/control bytes moved to 256+)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


@functools.lru_cache(maxsize=4)
def load_vocab(path: Path) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(token -> id, merge pair -> rank) from a merges file, in the original's id order.

    Cached per path, so tokenizers built from one file share these (read-only) dicts.
    """
    try:
        with gzip.open(path) as f:  # bytes, decoded as the original does (no newline translation)
            lines = f.read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]  # line 0 is a version header
    except (OSError, EOFError, UnicodeDecodeError) as error:  # not gzip, truncated, or not text
        raise ValueError(f"{path} is not CLIP's BPE merges file ({VOCAB_FILE}): cannot read it ({error})") from error
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not CLIP's BPE merges file ({VOCAB_FILE}): expected {NUM_MERGES} merge pairs")
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), SOT, EOT]
    return {t: i for i, t in enumerate(tokens)}, {m: i for i, m in enumerate(merges)}


def clean_text(text: str) -> str:
    """The original's 'lower' cleaning: ftfy.fix_text, html.unescape twice, whitespace collapse, lower-case."""
    if _NEEDS_FTFY.search(text):
        text = html.unescape(html.unescape(_fix_text(text)))
    return " ".join(text.split()).lower()  # split() also does the original's strip()s


def _clean_chunks(text: str) -> list[str]:
    """`clean_text(text)` cut at its spaces into chunks, the keys of the tokenizer's cache.

    No pre-token contains a space (every alternative of the regex excludes it), so pre-tokenising the
    chunks one by one gives exactly the original's words.
    """
    if _NEEDS_FTFY.search(text) is None:
        return text.lower().split()  # ASCII: equal to clean_text(text).split(" ")
    cleaned = clean_text(text)
    return cleaned.split(" ") if cleaned else []


class _Memo(dict):
    """A dict that computes a missing value with `fn` and is emptied when it holds `size` entries.

    Emptying is O(1) per insert and bounds memory on endless corpora; frequent keys return at the cost
    of one recomputation. Lookups stay plain C dict lookups (`map(memo.__getitem__, keys)`).
    """

    def __init__(self, fn: Callable[[str], tuple[int, ...]], size: int) -> None:
        super().__init__()
        self.fn, self.size = fn, size

    def __missing__(self, key: str) -> tuple[int, ...]:
        value = self.fn(key)
        if len(self) >= self.size:
            self.clear()
        self[key] = value
        return value


class ClipTokenizer:
    """Callable like open_clip's tokenizer: `tok(texts, context_length=77)` -> LongTensor [batch, context_length].

    Rows are `<start_of_text> ids <end_of_text>` padded with 0; longer texts are truncated so that the
    last kept token is `<end_of_text>`. `specials_in_text` says which words in the text become the special
    ids: "open_clip" (`<start_of_text>`, the default), "openai" (`<|startoftext|>`) or "none" (see the
    module docstring). `cache_size` bounds each of the two caches (chunk -> ids and word -> ids), which
    are cleared when full.
    """

    def __init__(
        self,
        bpe_path: str | os.PathLike | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        cache_size: int = 1 << 16,
        specials_in_text: str = "open_clip",
    ) -> None:
        if specials_in_text not in SPECIALS_IN_TEXT:
            raise ValueError(f"specials_in_text must be one of {tuple(SPECIALS_IN_TEXT)}, got {specials_in_text!r}")
        self.bpe_path = find_vocab_file(bpe_path)
        self.encoder, self.bpe_ranks = load_vocab(self.bpe_path.resolve())
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        # Latin-1 decoding turns bytes into chars 0..255; this table then maps them to CLIP's symbols.
        self._byte_table = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})
        self.sot_token_id, self.eot_token_id = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(self.encoder)
        self.context_length = _check_context_length(context_length)
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        self.cache_size = cache_size
        # The originals match their spelling of the special tokens as whole words and map them to the ids.
        self.specials_in_text = specials_in_text
        self._word_re, self._ascii_word_re = _word_res(specials_in_text)
        self._specials = dict(zip(SPECIALS_IN_TEXT[specials_in_text], ((self.sot_token_id,), (self.eot_token_id,))))
        self._words = _Memo(self._encode_word, cache_size)  # pre-token -> ids
        self._chunks = _Memo(self._encode_chunk, cache_size)  # space-free chunk of cleaned text -> ids

    def __reduce__(self) -> tuple:
        # Pickle (e.g. to DataLoader workers) as the arguments only: workers reload the vocab themselves.
        return type(self), (self.bpe_path, self.context_length, self.cache_size, self.specials_in_text)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one byte-mapped word: repeatedly merge every occurrence of the lowest-ranked pair."""
        symbols = [*word[:-1], word[-1] + "</w>"]
        ranks, unranked = self.bpe_ranks, len(self.bpe_ranks)
        while len(symbols) > 1:
            pair = min(itertools.pairwise(symbols), key=lambda p: ranks.get(p, unranked))
            if pair not in ranks:
                break
            first, second = pair
            merged, i = [], 0
            while i < len(symbols):  # left to right, non-overlapping, as the original
                if symbols[i] == first and i + 1 < len(symbols) and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.encoder[s] for s in symbols)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        if word in self._specials:
            return self._specials[word]
        return self._bpe(word.encode("utf-8").decode("latin-1").translate(self._byte_table))

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        words = (self._ascii_word_re if chunk.isascii() else self._word_re).findall(chunk)
        return tuple(itertools.chain.from_iterable(map(self._words.__getitem__, words)))

    def _encode(self, text: str) -> list[int]:
        return list(itertools.chain.from_iterable(map(self._chunks.__getitem__, _clean_chunks(text))))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without start/end tokens (the original's `encode`)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._encode(text)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of `ids` as the original decodes it: words end with a space, specials spelled out."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        try:
            symbols = "".join(self.decoder[i] for i in ids)
        except (KeyError, TypeError) as err:
            raise ValueError(f"ids must be ints in [0, {self.vocab_size}), got {err.args[0]!r}") from None
        data = bytearray(self.byte_decoder[c] for c in symbols)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """LongTensor [len(texts), context_length]: start, ids, end, 0-padding; truncated to end with `end`."""
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, Sequence) or isinstance(texts, (bytes, bytearray)):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        length = _check_context_length(self.context_length if context_length is None else context_length)
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
            ids = self._encode(text)
            del ids[length - 2 :]  # truncate: the end token then takes the last place
            rows.append(ids)
        return _pack(rows, length, self.sot_token_id, self.eot_token_id)


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int):
        raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (room for start and end tokens), got {context_length}")
    return context_length


def _pack(rows: list[list[int]], length: int, sot: int, eot: int) -> torch.Tensor:
    """[sot, *row, eot] per row, zero-padded to `length`, with one masked numpy assignment for the whole batch."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))  # (B,)
    out = np.zeros((len(rows), length), dtype=np.int64)  # (B, L)
    out[:, 0] = sot
    positions = np.arange(length)
    body = (positions >= 1) & (positions <= lengths[:, None])  # (B, L): row-major order = concatenated rows
    out[body] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    out[np.arange(len(rows)), lengths + 1] = eot
    return torch.from_numpy(out)


@functools.cache
def get_tokenizer() -> ClipTokenizer:
    """The process-wide default tokenizer (vocab found as in `find_vocab_file`)."""
    return ClipTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """open_clip's `tokenize`: LongTensor [batch, context_length] from the default tokenizer."""
    return get_tokenizer()(texts, context_length)
