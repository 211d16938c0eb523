"""Caption CSVs as open_clip writes and reads them: the separator read from the header line (open_clip's
files are tab-separated under a .csv name), image paths relative to the CSV's folder or else the working
directory, open_clip's flag spellings, and why a sample was skipped travelling with its batch so that the
training loop can log each file once and stop on data that cannot be read."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train import parse_train_flags

from fastclip.data.pairs import (
    CaptionCsvDataset,
    PairBatch,
    SkipLog,
    collate_pairs,
    normalize_separator,
    sniff_separator,
    take_skip_reasons,
)
from fastclip.train.data import EARLY_BATCHES, DataHealth

SIZE = lambda image: image.size  # a transform that shows which file was read (each test image has its own size)


def tokens(texts: list[str]) -> torch.Tensor:
    return torch.zeros(len(texts), 4, dtype=torch.long)


def image(path: Path, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, 10), (200, 30, 30)).save(path)


# --- separator -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, text, caption",
    [
        (
            "pairs.csv",
            "filepath\ttitle\na.png\ta caption, with a comma\n",
            "a caption, with a comma",
        ),  # open_clip's default
        ("pairs.tsv", "filepath,title\na.png,a caption\n", "a caption"),  # the name does not decide
        ("pairs.txt", "title,filepath,extra\nanother caption,a.png,x\n", "another caption"),
    ],
)
def test_separator_is_read_from_the_header(tmp_path: Path, name: str, text: str, caption: str) -> None:
    image(tmp_path / "a.png", 7)
    (tmp_path / name).write_text(text)
    assert CaptionCsvDataset(tmp_path / name, SIZE)[0] == ((7, 10), caption)


def test_sniffing_prefers_the_separator_that_yields_the_columns() -> None:
    assert sniff_separator("filepath\ttitle,with comma\r\n", ["filepath", "title,with comma"]) == "\t"
    assert sniff_separator("a,b\tc,d\n", ["a", "b\tc"]) == ","
    assert sniff_separator("path;caption\n", ["filepath", "title"]) == ","  # neither: the column error names ','


@pytest.mark.parametrize("given, meant", [("\t", "\t"), ("\\t", "\t"), ("tab", "\t"), (";", ";"), ("comma", ",")])
def test_separator_spellings(given: str, meant: str) -> None:
    assert normalize_separator(given) == meant


def test_explicit_separator_and_its_errors(tmp_path: Path) -> None:
    image(tmp_path / "a.png", 5)
    (tmp_path / "pairs.csv").write_text("filepath;title\na.png;semi colons\n")
    assert CaptionCsvDataset(tmp_path / "pairs.csv", SIZE, separator=";")[0] == ((5, 10), "semi colons")
    with pytest.raises(
        ValueError, match=r"\(separator ','; pass separator= in Python, --csv-separator to fastclip train"
    ):
        CaptionCsvDataset(tmp_path / "pairs.csv", SIZE)
    with pytest.raises(ValueError, match="separator must be one character, got ';;'"):
        CaptionCsvDataset(tmp_path / "pairs.csv", SIZE, separator=";;")


def test_open_clip_flag_spellings() -> None:
    config = parse_train_flags(
        [
            "--dataset",
            "csv",
            "--train-data",
            "x.csv",
            "--csv-img-key",
            "image",
            "--csv-caption-key",
            "caption",
            "--csv-separator",
            "\\t",
        ]
    )
    assert (config.csv_image_key, config.csv_caption_key, config.csv_separator) == ("image", "caption", "\\t")
    assert parse_train_flags(["--csv-image-key", "path"]).csv_image_key == "path"
    with pytest.raises(ValueError, match="separator"):
        parse_train_flags(["--csv-separator", "two"])


# --- image paths ---------------------------------------------------------------------------------------


def test_relative_paths_try_the_csv_folder_then_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    lists, work = tmp_path / "lists", tmp_path / "work"
    image(lists / "img" / "both.png", 3)  # in both places: the CSV's folder wins
    image(work / "img" / "both.png", 4)
    image(work / "img" / "cwd.png", 6)  # only where the command runs (open_clip's rule)
    (lists / "pairs.csv").write_text(
        "filepath\ttitle\nimg/both.png\tboth\nimg/cwd.png\tcwd\nimg/none.png\tnone\n"
        f"{work / 'img' / 'cwd.png'}\tabsolute\n"
    )
    monkeypatch.chdir(work)
    dataset = CaptionCsvDataset(lists / "pairs.csv", SIZE)
    assert dataset[0] == ((3, 10), "both") and dataset[1] == ((6, 10), "cwd") and dataset[3] == ((6, 10), "absolute")
    take_skip_reasons()  # forget the reasons noted by the reads above
    batch = collate_pairs([dataset[2]], tokens)
    assert batch.skipped == 1
    (reason,) = batch.skip_reasons
    assert reason == f"pairs.csv item 2: image 'img/none.png' not found in {lists} nor in {work}"
    assert dataset.describe_lookup() == (
        f"relative image paths are looked up in {lists} (the CSV file's folder), then in {work} (the working directory)"
    )


def test_an_open_clip_csv_trains_from_the_command_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """Tab-separated under a .csv name, paths relative to the working directory, open_clip's flag spellings."""
    from fastclip.cli import main as cli_main

    for i in range(8):
        image(tmp_path / "images" / f"{i}.png", 8 + i)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "train.csv").write_text(
        "image\tcaption\n" + "".join(f"images/{i}.png\ta red picture {i}\n" for i in range(8))
    )
    monkeypatch.chdir(tmp_path)
    code = cli_main(
        [
            "train",
            "--model",
            "tiny-ViT",
            "--dataset",
            "csv",
            "--train-data",
            "meta/train.csv",
            "--csv-img-key",
            "image",
            "--csv-caption-key",
            "caption",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--output-dir",
            "run",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert '"skipped": 0' in capsys.readouterr().out


# --- skipped samples: reasons with the batch, logged once, data that cannot be read -----------------------


def test_skip_reasons_travel_with_their_batch(tmp_path: Path) -> None:
    image(tmp_path / "a.png", 5)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "pairs.csv").write_text("filepath,title\na.png,good\nbad.png,broken\nmissing.png,gone\na.png,  \n")
    dataset = CaptionCsvDataset(tmp_path / "pairs.csv", lambda im: torch.zeros(3, 2, 2))
    take_skip_reasons()  # none left over from other tests' reads
    first = collate_pairs([dataset[0], dataset[1]], tokens)
    second = collate_pairs([dataset[2], dataset[3]], tokens)
    assert first.skipped == 1 and len(first.skip_reasons) == 1 and "bad.png" in first.skip_reasons[0]
    assert second.skipped == 2 and "missing.png" in second.skip_reasons[0] and "empty caption" in second.skip_reasons[1]
    assert collate_pairs([dataset[0]], tokens).skip_reasons == ()


def test_skip_log_logs_each_reason_once_up_to_its_limit(caplog) -> None:
    log = SkipLog(limit=3, log=logging.getLogger("test.skips"))
    with caplog.at_level(logging.WARNING, logger="test.skips"):
        for reason in ["a", "b", "a", "a", "b", "c", "d", "e", "a"]:
            log.add(reason)
    assert [r.getMessage() for r in caplog.records] == [
        "skipping sample: a",
        "skipping sample: b",
        "skipping sample: c (further unreadable samples are counted, not logged)",
    ]


def batch(read: int, skipped: int, reasons: tuple[str, ...] = ()) -> PairBatch:
    return PairBatch(torch.zeros(read, 3, 2, 2), torch.zeros(read, 4, dtype=torch.long), skipped, None, reasons)


def test_data_health_judges_the_first_batches(caplog) -> None:
    health = DataHealth(0.5, "relative image paths are looked up in /data")
    with caplog.at_level(logging.WARNING, logger="fastclip.train"):
        for i in range(EARLY_BATCHES - 1):
            health.add(batch(2, 2, (f"file {i} missing",)))  # exactly half: allowed
        assert not caplog.records  # held back until judged
        health.add(batch(2, 2, ("file 9 missing",)))
    assert len(caplog.records) == 10 and health.judged
    health.end_epoch(read_in_epoch=5)
    with pytest.raises(
        ValueError,
        match=r"no training sample of a whole epoch could be read; the first: file 0 missing; "
        r"relative image paths are looked up in /data",
    ):
        health.end_epoch(read_in_epoch=0)
    mostly = DataHealth(0.5)
    for _ in range(EARLY_BATCHES - 1):
        mostly.add(batch(1, 3, ("x",)))
    with pytest.raises(
        ValueError, match=r"27 of the first 36 .*\(more than max_skip_fraction=0\.5; --max-skip-fraction 1"
    ):
        mostly.add(batch(0, 0))
    short = DataHealth(0.5)  # an epoch shorter than EARLY_BATCHES is judged at its end
    short.add(batch(1, 3, ("y",)))
    with pytest.raises(ValueError, match="3 of the first 4 training samples could not be read"):
        short.end_epoch(read_in_epoch=1)
    nothing = DataHealth(1.0)  # even "never stop" stops when nothing at all can be read
    with pytest.raises(
        ValueError, match=f"none of the first {4 * EARLY_BATCHES} training samples could be read; the first: z"
    ):
        for _ in range(EARLY_BATCHES):
            nothing.add(batch(0, 4, ("z",)))
