"""Tokenizer throughput: fastclip's ClipTokenizer vs open_clip's SimpleTokenizer (the Python original).

    python benchmarks/bench_tokenizer.py [--n 20000] [--repeats 3] [--out benchmarks/results/local]

Batch tokenization (texts -> LongTensor [N, 77]) of deterministic synthetic caption corpora: "captions"
(5-30 Zipf-distributed words, 10% of captions with a non-ASCII word, 2% with an HTML entity), "ascii"
and "unicode" (every caption non-ASCII, so every one goes through ftfy). Each tokenizer is timed cold
(fresh instance, empty caches) and warm (second pass over the same texts, the steady state of a long
training run), and its ids are checked against open_clip's in the same run. When HuggingFace
`tokenizers` is installed, the same Python cleaning followed by a Rust split + BPE built from CLIP's vocab
is measured too: the engine fastclip considered and did not ship (it was slower here).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import random
import statistics
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file, however this is run
import common  # noqa: E402
from common import Column, Table  # noqa: E402

from fastclip import tokenizer as tk  # noqa: E402

Tokenize = Callable[[list[str]], torch.Tensor]

COMMON_WORDS = """a an the of in on at with and by near two three man woman people child dog cat bird horse
car bus train street road city building house room table chair bed window door tree trees grass field park
beach water river lake sea mountain sky clouds snow sunset night white black red blue green yellow brown
small large old young standing sitting walking running playing holding looking wearing eating riding
front top side group view close up photo picture image illustration vector stock background isolated
texture pattern design logo art painting drawing portrait landscape wooden metal plastic glass""".split()
UNICODE_WORDS = """café naïve crème brûlée Zürich São Paulo jalapeño Ελλάδα Москва 東京 北京 고양이 ラーメン
😀 🐶 ❤️ 👍🏽 “quoted” it’s 5°C ½ Ｔｏｋｙｏ ﬁne""".split()


def make_corpus(n: int, unicode_share: float, entity_share: float, seed: int = 0) -> list[str]:
    """`n` captions of 5-30 words: Zipf-weighted common words plus 5000 synthetic rare words (names)."""
    rng = random.Random(seed)
    rare = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12))) for _ in range(5000)]
    vocabulary = COMMON_WORDS + rare
    weights = [1.0 / (rank + 1) for rank in range(len(vocabulary))]
    texts = []
    for _ in range(n):
        words = rng.choices(vocabulary, weights, k=rng.randint(5, 30))
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), str(rng.randint(2, 2024)))
        if rng.random() < unicode_share:
            words[rng.randrange(len(words))] = rng.choice(UNICODE_WORDS)
        if rng.random() < entity_share:
            words.insert(rng.randrange(len(words)), "&amp;")
        text = " ".join(words)
        texts.append(text[0].upper() + text[1:] + rng.choice([".", "", ",", "!"]))
    return texts


def load_open_clip() -> type:
    """open_clip's SimpleTokenizer class, loaded by file path (`import open_clip` needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise SystemExit("open_clip is needed as the baseline: pip install --no-deps open-clip-torch")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    module_spec.loader.exec_module(module)
    if saved is None:  # its import disables HF tokenizers' threads; don't let that handicap the HF engine
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    return module.SimpleTokenizer


def make_hf_tokenizer(context_length: int = 77) -> Tokenize | None:
    """fastclip's cleaning, then HF `tokenizers` (Rust) for the split and BPE, packed like fastclip."""
    try:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    except ImportError:
        return None
    encoder, ranks = tk.load_vocab(tk.find_vocab_file().resolve())
    hf = Tokenizer(models.BPE(vocab=encoder, merges=list(ranks), end_of_word_suffix="</w>"))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("(?i)" + tk._word_res("open_clip")[0].pattern), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )

    def tokenize(texts: list[str]) -> torch.Tensor:
        encodings = hf.encode_batch_fast([tk.clean_text(t) for t in texts], add_special_tokens=False)
        rows = [e.ids[: context_length - 2] for e in encodings]
        return tk._pack(rows, context_length, encoder[tk.SOT], encoder[tk.EOT])

    return tokenize


def measure(factories: dict[str, Callable[[], Tokenize]], texts: list[str], repeats: int) -> dict[str, dict]:
    """Median texts/s per tokenizer, cold (fresh instance) and warm (its second pass), plus its last output.

    Repeats go round-robin over the tokenizers so that load from other processes hits all of them alike;
    construction (loading the vocab) is not timed.
    """
    rates = {name: {"cold": [], "warm": []} for name in factories}
    outputs = {}
    for _ in range(repeats):
        for name, factory in factories.items():
            tokenize = factory()
            for state in ("cold", "warm"):
                start = time.perf_counter()
                outputs[name] = tokenize(texts)
                rates[name][state].append(len(texts) / (time.perf_counter() - start))
    return {
        name: {f"{state}_texts_per_s": statistics.median(r[state]) for state in r} | {"output": outputs[name]}
        for name, r in rates.items()
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def plot(payload: dict, path: Path) -> Path | None:
    """Warm texts/s per corpus and tokenizer, log scale."""
    corpora = payload["corpora"]
    names = list(next(iter(corpora.values()))["results"])
    rates = {name: [c["results"][name]["warm_texts_per_s"] for c in corpora.values()] for name in names}
    title = f"CLIP tokenizer throughput ({payload['environment'].get('cpu_count')} CPUs)"
    return common.plot_bars(path, list(corpora), rates, ylabel="texts / s (warm, batch)", title=title, logy=True)


TABLE = Table(
    Column("tokenizer", 36, align="<"),
    Column("cold/s", 10, ".0f"),
    Column("warm/s", 10, ".0f"),
    Column("x cold", 7, ".1f"),
    Column("x warm", 7, ".1f"),
    Column("same ids", 9),
    indent="  ",
)


def compare(results: dict[str, dict], baseline: str) -> None:
    """Add to every tokenizer's results whether its ids equal `baseline`'s and its speed-ups over it."""
    reference = results[baseline]["output"]
    for r in results.values():
        r["identical_ids"] = bool(torch.equal(r.pop("output"), reference))
    base = results[baseline]
    for r in results.values():
        r["speedup_cold"] = r["cold_texts_per_s"] / base["cold_texts_per_s"]
        r["speedup_warm"] = r["warm_texts_per_s"] / base["warm_texts_per_s"]


def format_corpus(corpus_name: str, texts: list[str], results: dict[str, dict]) -> list[str]:
    lines = [f"\n{corpus_name}: {len(texts)} texts", TABLE.header()]
    for name, r in results.items():
        lines.append(
            TABLE.line(
                name,
                r["cold_texts_per_s"],
                r["warm_texts_per_s"],
                r["speedup_cold"],
                r["speedup_warm"],
                r["identical_ids"],
            )
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = common.benchmark_parser(__doc__)
    parser.add_argument("--n", type=int, default=20000, help="captions per corpus")
    parser.add_argument("--repeats", type=int, default=3, help="fresh instances per tokenizer (median)")
    common.add_out_argument(parser)
    args = parser.parse_args(argv)

    open_clip_tokenizer = load_open_clip()
    competitors: dict[str, Callable[[], Tokenize]] = {
        "open_clip SimpleTokenizer": open_clip_tokenizer,
        "fastclip ClipTokenizer": tk.ClipTokenizer,
    }
    if make_hf_tokenizer() is not None:
        competitors["HF tokenizers engine (not shipped)"] = make_hf_tokenizer
    corpora = {
        "captions": make_corpus(args.n, unicode_share=0.1, entity_share=0.02),
        "ascii": make_corpus(args.n, unicode_share=0.0, entity_share=0.0),
        "unicode": make_corpus(args.n, unicode_share=1.0, entity_share=0.0),
    }
    header = common.environment_header()
    header.update({p: _version(p) for p in ("ftfy", "regex", "tokenizers", "open_clip_torch")})
    config = vars(args) | {"out": str(args.out)}
    payload = {"benchmark": "tokenizer", "environment": header, "config": config, "corpora": {}}
    record = common.Record(args.out, "tokenizer", payload, rows=None)

    for corpus_name, texts in corpora.items():
        results = measure(competitors, texts, args.repeats)
        compare(results, "open_clip SimpleTokenizer")
        payload["corpora"][corpus_name] = {
            "n_texts": len(texts),
            "mean_words": sum(len(t.split()) for t in texts) / len(texts),
            "share_non_ascii": sum(not t.isascii() for t in texts) / len(texts),
            "results": results,
        }
        print("\n".join(format_corpus(corpus_name, texts, results)))
    print()
    record.finish(lambda path: plot(payload, path))


if __name__ == "__main__":
    main()
