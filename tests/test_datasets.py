"""The training data pipeline on real files written here: augmentation, CSV/TSV pairs, tar shards,
the resumable sampler, the synthetic shapes, and the collate function's skipped-sample accounting."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.data import synthetic
from fastclip.data.augment import TrainTransform
from fastclip.data.pairs import CaptionCsvDataset, PairBatch, collate_pairs, make_collate
from fastclip.data.sampler import ResumableSampler
from fastclip.data.shards import TarShardDataset, expand_braces, expand_shards
from fastclip.data.synthetic import COLOURS, HELDOUT_PAIRS, SHAPES, SyntheticShapes
from fastclip.data.transforms import CLIP_MEAN, CLIP_STD, CLIPPreprocess

MEAN, STD = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)


class CharTokenizer:
    """A stand-in for ClipTokenizer where its vocab file is absent: character codes, [B, 77]."""

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), 77, dtype=torch.long)
        for i, text in enumerate(texts):
            codes = [ord(c) for c in text[:75]]
            out[i, : len(codes) + 2] = torch.tensor([1, *codes, 2])
        return out


@pytest.fixture(scope="module")
def tokenizer():
    from fastclip.tokenizer import ClipTokenizer

    try:
        return ClipTokenizer()
    except FileNotFoundError:
        return CharTokenizer()


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


# --- TrainTransform ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        noise_image(50, 80),
        noise_image(90, 40).convert("L"),
        torch.randint(0, 256, (3, 50, 80), dtype=torch.uint8),
        torch.randint(0, 256, (1, 30, 30), dtype=torch.uint8),
    ],
    ids=["rgb", "grey", "tensor", "tensor1"],
)
def test_transform_shape_and_dtype(image) -> None:
    out = TrainTransform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_transform_without_randomness_is_eval_preprocessing() -> None:
    """Full-image crop, no jitter, square input: exactly CLIPPreprocess, on both input paths."""
    fixed = TrainTransform(24, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.0)
    image = noise_image(60, 60)
    torch.testing.assert_close(fixed(image), CLIPPreprocess(24)(image), atol=1e-6, rtol=0)
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    torch.testing.assert_close(fixed(tensor), CLIPPreprocess(24)(tensor), atol=1e-6, rtol=0)


def test_transform_normalisation() -> None:
    """A constant image stays constant through crop and jitter; without jitter it is (c/255 - mean)/std."""
    colour = torch.tensor([200.0, 30.0, 120.0]).view(3, 1, 1)
    image = Image.new("RGB", (70, 50), (200, 30, 120))
    out = TrainTransform(16, jitter=0.0)(image)
    torch.testing.assert_close(out, ((colour / 255 - MEAN) / STD).expand(3, 16, 16), atol=1e-5, rtol=0)
    jittered = TrainTransform(16, jitter=0.4)(image)
    assert (jittered.amax((1, 2)) - jittered.amin((1, 2))).abs().max() < 1e-5  # jitter is global, not per pixel
    # Noise in [0, 255]: normalised mean near (0.5 - mean) / std per channel.
    noisy = TrainTransform(64, jitter=0.0)(noise_image(256, 256))
    torch.testing.assert_close(noisy.mean((1, 2)), ((0.5 - MEAN) / STD).flatten(), atol=0.05, rtol=0)


def test_transform_randomness_is_seeded() -> None:
    transform, image = TrainTransform(32), noise_image(64, 96)
    torch.manual_seed(1)
    first, second = transform(image), transform(image)
    assert not torch.equal(first, second)
    torch.manual_seed(1)
    torch.testing.assert_close(transform(image), first, atol=0, rtol=0)
    state = torch.get_rng_state()
    a = transform(image, generator=torch.Generator().manual_seed(5))
    b = transform(image, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(torch.get_rng_state(), state)  # a passed generator leaves the global RNG alone


def test_jitter_changes_colour_but_keeps_its_name() -> None:
    """Brightness/contrast/saturation vary, but the small hue rotation never turns red into another hue."""
    image = Image.new("RGB", (40, 40), (220, 30, 30))
    transform = TrainTransform(8, jitter=0.4)
    colours = torch.stack([(transform(image) * STD + MEAN)[:, 0, 0] for _ in range(100)])  # (100, 3) in [0, 1]
    assert colours[:, 0].max() - colours[:, 0].min() > 0.2
    assert (colours.argmax(1) == 0).all() and (colours[:, 0] > colours[:, 1:].max(1).values + 0.1).all()
    plain = torch.stack([TrainTransform(8, jitter=0.0)(image)[:, 0, 0] for _ in range(5)])
    assert (plain - plain[0]).abs().max() < 1e-6


def test_transform_errors() -> None:
    for kwargs, word in [
        ({"image_size": 0}, "image_size"),
        ({"image_size": 8, "scale": (0.0, 1.0)}, "scale"),
        ({"image_size": 8, "ratio": (2.0, 1.0)}, "ratio"),
        ({"image_size": 8, "jitter": 1.5}, "jitter"),
    ]:
        with pytest.raises(ValueError, match=word):
            TrainTransform(**kwargs)
    with pytest.raises(TypeError, match="uint8"):
        TrainTransform(8)(torch.rand(3, 10, 10))
    with pytest.raises(TypeError, match="PIL"):
        TrainTransform(8)(np.zeros((10, 10, 3), np.uint8))


# --- CSV / TSV pairs and collate ----------------------------------------------------------------------


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    noise_image(40, 60, seed=1).save(folder / "a.jpg", quality=90)
    noise_image(50, 30, seed=2).save(folder / "b.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    jpeg = encoded(noise_image(64, 64, seed=3), "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return folder


def write_table(path: Path, rows: list[list[str]], separator: str) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as file:
        csv.writer(file, delimiter=separator).writerows(rows)


TABLE = [
    ["filepath", "title", "extra"],
    ["images/a.jpg", "a photo, with a comma", "x"],
    ["images/b.png", "a png image", "y"],
    ["images/missing.jpg", "no such file", "z"],
    ["images/corrupt.jpg", "garbage bytes", "z"],
    ["images/truncated.jpg", "half a jpeg", "z"],
    ["images/a.jpg", "   ", "z"],
]


@pytest.mark.parametrize("suffix, separator", [(".csv", ","), (".tsv", "\t")])
def test_csv_dataset_reads_and_skips(image_dir: Path, suffix: str, separator: str) -> None:
    path = image_dir.parent / f"pairs{suffix}"
    write_table(path, TABLE, separator)  # separator=None: picked from the suffix
    dataset = CaptionCsvDataset(path, TrainTransform(16))
    assert len(dataset) == 6
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s is None for s in samples] == [False, False, True, True, True, True]
    assert samples[0][1] == "a photo, with a comma" and samples[1][1] == "a png image"
    assert samples[0][0].shape == samples[1][0].shape == (3, 16, 16)


def test_csv_keys_root_and_absolute_paths(image_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    path = elsewhere / "pairs.txt"
    write_table(
        path, [["caption", "image"], ["relative to root", "a.jpg"], ["absolute", str(image_dir / "b.png")]], ";"
    )
    dataset = CaptionCsvDataset(
        path, CLIPPreprocess(8), image_key="image", caption_key="caption", separator=";", root=image_dir
    )
    assert [dataset[i][1] for i in range(2)] == ["relative to root", "absolute"]


def test_csv_header_errors(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    write_table(path, [["path", "title"], ["a.jpg", "x"]], ",")
    with pytest.raises(ValueError, match=r"no column 'filepath' \(image_key\).*\['path', 'title'\]"):
        CaptionCsvDataset(path, CLIPPreprocess(8))
    with pytest.raises(ValueError, match="caption_key"):
        CaptionCsvDataset(path, CLIPPreprocess(8), image_key="path", caption_key="text")
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        CaptionCsvDataset(tmp_path / "nothing.csv", CLIPPreprocess(8))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        CaptionCsvDataset(tmp_path / "empty.csv", CLIPPreprocess(8))


@pytest.mark.parametrize("workers", [0, 2])
def test_collate_counts_skipped_through_a_dataloader(image_dir: Path, tokenizer, workers: int) -> None:
    path = image_dir.parent / "pairs.tsv"
    write_table(path, TABLE, "\t")
    dataset = CaptionCsvDataset(path, TrainTransform(16))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=workers, collate_fn=make_collate(tokenizer))
    batches = list(loader)
    assert all(isinstance(b, PairBatch) for b in batches)
    assert [b.skipped for b in batches] == [1, 3] and [b.images.shape[0] for b in batches] == [2, 0]
    assert batches[0].images.shape == (2, 3, 16, 16) and batches[0].tokens.shape == (2, 77)
    assert batches[0].tokens.dtype == torch.long
    torch.testing.assert_close(batches[0].tokens, tokenizer(["a photo, with a comma", "a png image"]), atol=0, rtol=0)
    assert batches[1].images.shape == (0, 3, 0, 0) and batches[1].tokens.shape == (0, 77)  # all skipped: B = 0


def test_collate_errors_and_pickling(tokenizer) -> None:
    collate = pickle.loads(pickle.dumps(make_collate(tokenizer)))
    batch = collate([(torch.zeros(3, 4, 4), "a cat"), None])
    assert batch.images.shape == (1, 3, 4, 4) and batch.skipped == 1
    with pytest.raises(TypeError, match="pairs or None"):
        collate_pairs([("not a tensor", "a cat")], tokenizer)


def test_csv_label_column(image_dir: Path, tokenizer) -> None:
    path = image_dir.parent / "labelled.tsv"
    write_table(
        path,
        [
            ["filepath", "title", "label"],
            ["images/a.jpg", "a", " 7 "],
            ["images/missing.jpg", "gone", "2"],
            [],
            ["images/b.png", "b", "-1"],
        ],
        "\t",
    )
    dataset = CaptionCsvDataset(path, TrainTransform(16), label_key="label")
    assert dataset.labels == [7, 2, -1] and dataset[0][1:] == ("a", 7) and dataset[1] is None and dataset[2][2] == -1
    assert len(CaptionCsvDataset(path, TrainTransform(16))[0]) == 2  # without label_key: pairs, as before
    batch = make_collate(tokenizer)([dataset[i] for i in range(3)])
    assert batch.skipped == 1 and batch.labels.tolist() == [7, -1] and batch.labels.dtype == torch.long


@pytest.mark.parametrize(
    "value, what", [("3.5", "'3.5', not an integer class id"), ("", "no value"), (None, "no value")]
)
def test_csv_bad_label_names_file_row_and_column(tmp_path: Path, value: str | None, what: str) -> None:
    path = tmp_path / "pairs.csv"
    bad_row = ["b.jpg", "two"] + ([] if value is None else [value])  # None: the row is one column short
    write_table(path, [["filepath", "title", "cls"], ["a.jpg", "one", "0"], bad_row, ["c.jpg", "three", "1"]], ",")
    with pytest.raises(ValueError, match=rf"pairs.csv.*row 2 \(line 3\) has {what} in label column 'cls'"):
        CaptionCsvDataset(path, CLIPPreprocess(8), label_key="cls")
    with pytest.raises(ValueError, match=r"no column 'label' \(label_key\)"):
        CaptionCsvDataset(path, CLIPPreprocess(8), label_key="label")


def test_collate_labelled_triples(tokenizer) -> None:
    image = torch.zeros(3, 4, 4)
    batch = collate_pairs([(image, "a", 3), None, (image, "b", 3)], tokenizer)
    assert batch.labels.tolist() == [3, 3] and batch.skipped == 1
    assert collate_pairs([(image, "a")], tokenizer).labels is None
    with pytest.raises(TypeError, match="all be pairs or all"):
        collate_pairs([(image, "a", 1), (image, "b")], tokenizer)
    with pytest.raises(TypeError, match="int label"):
        collate_pairs([(image, "a", "1")], tokenizer)


# --- tar shards ----------------------------------------------------------------------------------------


def write_shard(path: Path, entries: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, files in entries:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good_entry(key: str, seed: int, format: str = "JPEG") -> tuple[str, dict[str, bytes]]:
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[format]
    image = noise_image(24 + seed % 7, 20 + seed % 5, seed=seed)
    return key, {ext: encoded(image, format), "txt": f"caption {key}".encode(), "json": b"{}"}


def make_shards(folder: Path, sizes: list[int], *, bad_every: int = 0) -> list[str]:
    """Shards of good entries (captions "caption s<shard>k<i>"); every `bad_every`-th one has a corrupt image."""
    paths = []
    for s, size in enumerate(sizes):
        entries = []
        for i in range(size):
            key, files = good_entry(f"s{s}k{i:03d}", seed=100 * s + i, format=("JPEG", "PNG")[i % 2])
            if bad_every and i % bad_every == bad_every - 1:
                files = {"jpg": b"corrupt", "txt": files["txt"]}
            entries.append((key, files))
        paths.append(str(write_shard(folder / f"shard-{s:03d}.tar", entries)))
    return paths


def test_expand_shard_patterns(tmp_path: Path) -> None:
    assert expand_braces("d/{00008..00011}.tar") == [f"d/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    paths = make_shards(tmp_path, [1, 1, 1])
    assert expand_shards(str(tmp_path / "shard-{000..002}.tar")) == paths
    assert expand_shards(str(tmp_path / "shard-*.tar")) == paths
    assert expand_shards(f"{paths[2]}::{paths[0]}") == [paths[2], paths[0]]
    assert expand_shards([Path(paths[1])]) == [paths[1]]
    with pytest.raises(FileNotFoundError, match="1 of 4 shard files do not exist"):
        expand_shards(str(tmp_path / "shard-{000..003}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_shards(str(tmp_path / "*.tgz"))


def test_shards_skip_bad_members_and_broken_tars(tmp_path: Path, tokenizer) -> None:
    good = [good_entry("k0", 0), good_entry("k1", 1, "PNG"), good_entry("k2", 2, "WEBP")]
    bad = [
        ("corrupt", {"jpg": b"not an image", "txt": b"a corrupt image"}),
        ("nocaption", {"jpg": good[0][1]["jpg"]}),
        ("noimage", {"txt": b"a caption without image"}),
        ("emptycaption", {"png": good[1][1]["png"], "txt": b"  \n"}),
    ]
    write_shard(tmp_path / "a.tar", [good[0], *bad, good[1]])
    whole = write_shard(tmp_path / "b.tar", [good[2], good_entry("k3", 3), good_entry("k4", 4)]).read_bytes()
    with tarfile.open(tmp_path / "b.tar") as tar:
        cut = tar.getmember("k4.jpg").offset_data + 10
    (tmp_path / "b.tar").write_bytes(whole[:cut])  # truncated inside k4's image
    (tmp_path / "c.tar").write_bytes(b"this is not a tar file at all" * 40)
    dataset = TarShardDataset(str(tmp_path / "{a,b,c}.tar"), TrainTransform(16), shuffle=False)
    samples = list(dataset)
    captions = [s[1] for s in samples if s is not None]
    assert captions == ["caption k0", "caption k1", "caption k2", "caption k3"]
    assert sum(s is None for s in samples) == 4 + 1 + 1  # the bad keys, one per broken shard
    assert all(s[0].shape == (3, 16, 16) for s in samples if s is not None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=make_collate(tokenizer))
    batches = list(loader)
    assert sum(b.skipped for b in batches) == 6 and sum(b.images.shape[0] for b in batches) == len(captions)


def test_shard_cls_labels(tmp_path: Path, tokenizer) -> None:
    entries = []
    for i, cls in enumerate([b"4", b" 12\n", None, b"x", b"0"]):
        key, files = good_entry(f"k{i}", i)
        if cls is not None:
            files["cls"] = cls
        entries.append((key, files))
    path = str(write_shard(tmp_path / "a.tar", entries))
    dataset = TarShardDataset(path, TrainTransform(16), shuffle=False, label_extension="cls")
    samples = list(dataset)
    assert [s if s is None else s[1:] for s in samples] == [
        ("caption k0", 4),
        ("caption k1", 12),
        None,
        None,
        ("caption k4", 0),
    ]
    plain = list(TarShardDataset(path, TrainTransform(16), shuffle=False))  # without labels: pairs, cls ignored
    assert all(len(s) == 2 for s in plain) and len(plain) == 5
    batch = make_collate(tokenizer)(samples)
    assert batch.labels.tolist() == [4, 12, 0] and batch.skipped == 2
    with pytest.raises(ValueError, match="label_extension"):
        TarShardDataset(path, TrainTransform(16), label_extension=".cls")


def stream_captions(dataset: TarShardDataset, workers: int, batch_size: int = 1) -> list[str]:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=lambda samples: [s[1] for s in samples if s is not None],
    )
    return [caption for batch in loader for caption in batch]


def test_shards_split_across_ranks_and_workers(tmp_path: Path) -> None:
    paths = make_shards(tmp_path, [5, 3, 4, 6])
    everything = {f"caption s{s}k{i:03d}" for s, n in enumerate([5, 3, 4, 6]) for i in range(n)}
    per_rank = [
        stream_captions(TarShardDataset(paths, CLIPPreprocess(8), seed=3, rank=r, world_size=2), workers=2)
        for r in range(2)
    ]
    assert set(per_rank[0]).isdisjoint(per_rank[1]) and set(per_rank[0]) | set(per_rank[1]) == everything
    assert sum(map(len, per_rank)) == len(everything)
    with pytest.raises(ValueError, match="world_size=5"):
        TarShardDataset(paths, CLIPPreprocess(8), rank=0, world_size=5)
    with pytest.raises(ValueError, match="rank must be < world_size=2"):
        TarShardDataset(paths, CLIPPreprocess(8), rank=2, world_size=2)


def test_too_few_shards_for_the_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Checked as a worker would see it: a DataLoader whose workers all raise takes 10 s to shut down.
    worker = type("WorkerInfo", (), {"num_workers": 2, "id": 0})()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: worker)
    dataset = TarShardDataset(make_shards(tmp_path, [1, 1, 1]), CLIPPreprocess(8), rank=1, world_size=2)
    with pytest.raises(
        ValueError,
        match=r"rank 1 gets 1 of the 3 shards \(world_size=2\), "
        r"fewer than its 2 DataLoader workers: use num_workers <= 1",
    ):
        next(iter(dataset))  # 3 shards: rank 1 gets one, too few for 2 workers


def test_shard_order_per_epoch(tmp_path: Path) -> None:
    dataset = TarShardDataset(make_shards(tmp_path, [1] * 8), CLIPPreprocess(8), seed=0)
    assert dataset.epoch_shards(0) == dataset.epoch_shards(0) and sorted(dataset.epoch_shards(0)) == list(range(8))
    assert dataset.epoch_shards(0) != dataset.epoch_shards(1)
    dataset.set_epoch(1)
    first = stream_captions(dataset, workers=0)
    assert first == stream_captions(dataset, workers=0)  # the same epoch again: the same stream
    dataset.set_epoch(2)
    second = stream_captions(dataset, workers=0)
    assert sorted(second) == sorted(first) and second != first


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_resume_is_the_tail_of_the_stream(tmp_path: Path, tokenizer, workers: int) -> None:
    """Resuming after D batches yields exactly batches D, D+1, ... of the uninterrupted epoch, augmentation included."""
    # Uneven shards; every 4th entry corrupt (a None that still fills a batch slot).
    dataset = TarShardDataset(make_shards(tmp_path, [9, 7, 11, 8, 10]), TrainTransform(12), seed=1, shuffle_buffer=6)
    batch_size = 3
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, drop_last=True, collate_fn=make_collate(tokenizer)
    )
    dataset.set_position(2, 0, batch_size)
    full = list(loader)
    assert len(full) >= 10 and sum(b.images.shape[0] for b in full) > 0
    for done in (1, 4, 5):  # not multiples of the worker count too: worker roles rotate
        dataset.set_position(2, done, batch_size)
        resumed = list(loader)
        assert len(resumed) == len(full) - done
        for got, want in zip(resumed, full[done:]):
            assert torch.equal(got.images, want.images) and torch.equal(got.tokens, want.tokens)
            assert got.skipped == want.skipped


def test_shard_resume_counts_none_entries(tmp_path: Path, tokenizer) -> None:
    dataset = TarShardDataset(make_shards(tmp_path, [12], bad_every=3), CLIPPreprocess(8), shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=make_collate(tokenizer))
    full = list(loader)
    assert [b.skipped for b in full] == [1, 1, 2]  # entries 2, 5, 8 and 11
    dataset.set_position(0, 2, 4)
    (last,) = list(loader)
    assert torch.equal(last.tokens, full[2].tokens)


# --- ResumableSampler ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_resume_is_the_tail(shuffle: bool) -> None:
    sampler = ResumableSampler(23, shuffle=shuffle, seed=4, rank=1, world_size=3)
    sampler.set_position(5, 0)
    full = list(sampler)
    assert len(full) == len(sampler) == 7
    for index in (0, 1, 6, 7):
        sampler.set_position(5, index)
        assert list(sampler) == full[index:]
    sampler.set_position(5, 3)
    list(sampler)
    assert list(sampler) == sampler.epoch_indices(6).tolist()  # then the next epoch, from its start
    assert (
        list(ResumableSampler(23, shuffle=shuffle, seed=4, rank=1, world_size=3)) == sampler.epoch_indices(0).tolist()
    )


def test_sampler_orders_per_epoch_and_seed() -> None:
    sampler = ResumableSampler(50)
    orders = [sampler.epoch_indices(e).tolist() for e in range(3)]
    assert all(sorted(order) == list(range(50)) for order in orders)
    assert orders[0] != orders[1] != orders[2]
    assert ResumableSampler(50, seed=1).epoch_indices(0).tolist() != orders[0]
    assert ResumableSampler(50, seed=0).epoch_indices(0).tolist() == orders[0]
    assert ResumableSampler(50, shuffle=False).epoch_indices(3).tolist() == list(range(50))


@pytest.mark.parametrize("num_samples, world_size", [(20, 4), (23, 4), (5, 3)])
def test_sampler_ranks_disjoint_and_covering(num_samples: int, world_size: int) -> None:
    dropped = [
        ResumableSampler(num_samples, seed=2, rank=r, world_size=world_size).epoch_indices(1).tolist()
        for r in range(world_size)
    ]
    assert len({len(d) for d in dropped}) == 1 and len(dropped[0]) == num_samples // world_size
    flat = [i for d in dropped for i in d]
    assert len(set(flat)) == len(flat)  # disjoint
    padded = [
        ResumableSampler(num_samples, seed=2, rank=r, world_size=world_size, drop_last=False) for r in range(world_size)
    ]
    assert len({len(s) for s in padded}) == 1
    assert set(i for s in padded for i in s.epoch_indices(1).tolist()) == set(range(num_samples))  # covering
    assert sum(len(s) for s in padded) - num_samples < world_size


def test_sampler_in_a_dataloader_resumes(tokenizer) -> None:
    dataset = SyntheticShapes(40, 16, seed=3)
    sampler = ResumableSampler(len(dataset), seed=1, world_size=2, rank=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, sampler=sampler, num_workers=2, collate_fn=make_collate(tokenizer)
    )
    sampler.set_position(1, 0)
    full = list(loader)
    sampler.set_position(1, 3 * 4)
    resumed = list(loader)
    assert len(full) == 5 and len(resumed) == 2
    assert all(torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens) for a, b in zip(resumed, full[3:]))


def test_sampler_errors() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        ResumableSampler(0)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="index must be <= 5"):
        ResumableSampler(10, world_size=2).set_position(0, 6)


# --- SyntheticShapes -------------------------------------------------------------------------------------


def test_synthetic_is_deterministic() -> None:
    a, b = SyntheticShapes(100, 32, seed=7), SyntheticShapes(100, 32, seed=7)
    for index in (0, 13, 99):
        image, caption = a[index]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        again, caption_again = b[index]
        assert torch.equal(image, again) and caption == caption_again
    assert not torch.equal(a[0][0], SyntheticShapes(100, 32, seed=8)[0][0])
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], SyntheticShapes(100, 32, seed=7, split="test")[0][0])
    transformed = SyntheticShapes(100, 32, seed=7, transform=CLIPPreprocess(24))[13]
    assert transformed[0].shape == (3, 24, 24) and transformed[1] == b[13][1]
    with pytest.raises(IndexError):
        a[100]


def test_synthetic_captions_and_pixels_match_attributes() -> None:
    dataset = SyntheticShapes(60, 64, seed=1)
    names = synthetic.class_names()
    assert len(names) == len(COLOURS) * len(SHAPES) and names[0] == "red circle"
    counts = {"small": [], "large": []}
    for index in range(len(dataset)):
        info = dataset.attributes(index)
        image, caption = dataset[index]
        assert caption == info["caption"] and info["colour"] in caption and info["shape"] in caption
        if f"{info['size']} " not in caption:
            assert "small" not in caption and "large" not in caption
        assert names[info["class_index"]] == f"{info['colour']} {info['shape']}" == names[dataset.label_of(index)]
        # The shape's pixels: the named colour, in the named part of the image.
        pixels = image.permute(1, 2, 0).float()  # (64, 64, 3)
        near = (pixels - torch.tensor(COLOURS[info["colour"]], dtype=torch.float)).norm(dim=-1) < 30
        ys, xs = near.nonzero(as_tuple=True)
        assert len(xs) > 40, (index, info)
        cx, cy = xs.float().mean() / 64, ys.float().mean() / 64
        want = {
            "left": (0.27, 0.5),
            "right": (0.73, 0.5),
            "top": (0.5, 0.27),
            "bottom": (0.5, 0.73),
            "center": (0.5, 0.5),
        }
        assert abs(cx - want[info["position"]][0]) < 0.1 and abs(cy - want[info["position"]][1]) < 0.1, (index, info)
        counts[info["size"]].append(len(xs))
    assert np.mean(counts["large"]) > 2 * np.mean(counts["small"])


def test_synthetic_heldout_pairs_are_exclusive() -> None:
    heldout = set(HELDOUT_PAIRS)
    all_pairs = {(c, s) for c in COLOURS for s in SHAPES}
    assert heldout < all_pairs and 0.15 <= len(heldout) / len(all_pairs) <= 0.2
    train_pairs = all_pairs - heldout
    assert {c for c, _ in train_pairs} == set(COLOURS) and {s for _, s in train_pairs} == set(SHAPES)

    def pairs(split: str, n: int = 3000) -> set[tuple[str, str]]:
        dataset = SyntheticShapes(n, 32, seed=0, split=split)
        return {(info["colour"], info["shape"]) for info in map(dataset.attributes, range(n))}

    assert pairs("train") == train_pairs
    assert pairs("heldout", 500) == heldout
    assert pairs("test") == all_pairs


def test_synthetic_extra_colours_train_only_and_never_the_heldout_pairs() -> None:
    from fastclip.data.synthetic import EXTRA_COLOURS, class_index, class_names

    n = 4000
    dataset = SyntheticShapes(n, 32, seed=3, split="train", extra_colours=True)
    infos = [dataset.attributes(i) for i in range(n)]
    seen = {(info["colour"], info["shape"]) for info in infos}
    extra = {(c, s) for c in EXTRA_COLOURS for s in SHAPES}
    named = {(c, s) for c in COLOURS for s in SHAPES} - set(HELDOUT_PAIRS)
    assert seen == named | extra and not seen & set(HELDOUT_PAIRS)
    # written out, not from the module's own lists: the training-only colours and the held-out pairs
    assert sorted(EXTRA_COLOURS) == ["brown", "cyan", "grey", "pink"]
    assert {("red", "triangle"), ("white", "cross"), ("blue", "square")} <= set(HELDOUT_PAIRS)
    assert not any((info["colour"], info["shape"]) in {("red", "triangle"), ("white", "cross")} for info in infos)
    # no training-only colour is, or passes for, an evaluation colour; the evaluation classes are unchanged
    assert not set(EXTRA_COLOURS) & set(COLOURS) and len(class_names()) == 40
    distances = [np.linalg.norm(np.subtract(a, b)) for a in EXTRA_COLOURS.values() for b in COLOURS.values()]
    assert min(distances) > 90
    # labels: unique per pair, the extra ones after the 40 evaluation classes; captions name the colour drawn
    labels = {(info["colour"], info["shape"]): info["class_index"] for info in infos}
    assert len(set(labels.values())) == len(labels)
    assert all((label >= 40) == (pair in extra) for pair, label in labels.items())
    assert labels[("cyan", "circle")] == class_index("cyan", "circle") == 40
    assert all(info["colour"] in info["caption"] and info["shape"] in info["caption"] for info in infos[:200])
    # the shape is drawn in its colour (within the +-15 per channel of every shape): a grey one is grey
    grey = next(i for i, info in enumerate(infos) if info["colour"] == "grey" and info["size"] == "large")
    pixels = dataset[grey][0].permute(1, 2, 0).reshape(-1, 3).int()
    near = (pixels - torch.tensor(EXTRA_COLOURS["grey"])).abs().amax(1) <= 16
    assert near.sum() > 30
    # without the option the training stream is as before; the other splits refuse it
    plain = SyntheticShapes(200, 32, seed=3, split="train")
    assert {(i["colour"], i["shape"]) for i in map(plain.attributes, range(200))} <= named
    for split in ("test", "heldout"):
        with pytest.raises(ValueError, match="extra_colours"):
            SyntheticShapes(10, split=split, extra_colours=True)


def test_synthetic_through_dataloader_workers(tokenizer) -> None:
    dataset = SyntheticShapes(16, 32, seed=2, transform=TrainTransform(32))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=make_collate(tokenizer))
    batches = list(loader)
    assert [b.images.shape for b in batches] == [(8, 3, 32, 32)] * 2 and all(b.skipped == 0 for b in batches)


def test_synthetic_errors() -> None:
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes(10, split="validation")
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticShapes(0)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticShapes(10, image_size=8)
