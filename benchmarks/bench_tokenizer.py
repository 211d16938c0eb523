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

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file (also when imported)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fastclip from a checkout

from common import DEFAULT_OUT, environment_header, write_results  # noqa: E402
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
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("(?i)" + tk._word_res("open_clip")[0].pattern), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])

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


def plot(payload: dict, path: Path) -> None:
    """Warm texts/s per corpus and tokenizer, log scale (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    corpora = payload["corpora"]
    names = list(next(iter(corpora.values()))["results"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        rates = [c["results"][name]["warm_texts_per_s"] for c in corpora.values()]
        ax.bar([x + i * width for x in range(len(corpora))], rates, width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(corpora))], list(corpora))
    ax.set_yscale("log")
    ax.set_ylabel("texts / s (warm, batch)")
    ax.set_title(f"CLIP tokenizer throughput ({payload['environment'].get('cpu_count')} CPUs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="captions per corpus")
    parser.add_argument("--repeats", type=int, default=3, help="fresh instances per tokenizer (median)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args()

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
    header = environment_header()
    header.update({p: _version(p) for p in ("ftfy", "regex", "tokenizers", "open_clip_torch")})
    payload = {"benchmark": "tokenizer", "environment": header, "config": vars(args) | {"out": str(args.out)}, "corpora": {}}

    for corpus_name, texts in corpora.items():
        results = measure(competitors, texts, args.repeats)
        reference = results["open_clip SimpleTokenizer"]["output"]
        for r in results.values():
            r["identical_ids"] = bool(torch.equal(r.pop("output"), reference))
        base = results["open_clip SimpleTokenizer"]
        for r in results.values():
            r["speedup_cold"] = r["cold_texts_per_s"] / base["cold_texts_per_s"]
            r["speedup_warm"] = r["warm_texts_per_s"] / base["warm_texts_per_s"]
        payload["corpora"][corpus_name] = {
            "n_texts": len(texts),
            "mean_words": sum(len(t.split()) for t in texts) / len(texts),
            "share_non_ascii": sum(not t.isascii() for t in texts) / len(texts),
            "results": results,
        }
        print(f"\n{corpus_name}: {len(texts)} texts")
        print(f"  {'tokenizer':36s} {'cold/s':>10s} {'warm/s':>10s} {'x cold':>7s} {'x warm':>7s}  same ids")
        for name, r in results.items():
            print(f"  {name:36s} {r['cold_texts_per_s']:10.0f} {r['warm_texts_per_s']:10.0f} "
                  f"{r['speedup_cold']:7.1f} {r['speedup_warm']:7.1f}  {r['identical_ids']}")

    path = write_results(args.out, "tokenizer", payload)
    plot(payload, args.out / "tokenizer.png")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
