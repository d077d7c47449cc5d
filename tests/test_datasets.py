"""Public data sets: the Hub calls (replaced here: no network) and the conversion to jsonl splits.

The conversions are checked on the copies in ../shared/data: each copy is turned back
into the layout the Hub serves (parquet rows of lines, one text per split, a text file
with <|endoftext|> between stories) and must come out as the same documents.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mixtral_mlx  # noqa: F401
from mixtral_mlx import datasets
from mixtral_mlx.datasets import DATASETS, download, paragraphs, split_documents, wikitext_articles
from mixtral_mlx.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"{SHARED} is absent: no copies to convert")


def shared_docs(name: str, split: str) -> list[str]:
    return [json.loads(line)["text"] for line in (SHARED / name / f"{split}.jsonl").open(encoding="utf-8")]


def wikitext_rows(articles: list[str]) -> list[str]:
    """The Hub's layout: one row per line; titles and section headings between blank rows."""
    rows = []
    for article in articles:
        title, *lines = article.split("\n")
        rows += ["", title + "\n", ""]
        for line in lines:
            rows += ["", line + "\n", ""] if line.startswith(" = = ") else [line + "\n"]
    return rows


def write_parquet(path: Path, texts: list[str]) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), path)
    return path


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download: serves files built from ../shared/data."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def __call__(self, repo_id, filename, repo_type=None, revision=None):
        self.calls.append((repo_id, filename, repo_type, revision))
        path = self.root / repo_id / filename
        split = next(ours for theirs, ours in (("train", "train"), ("validation", "val"), ("valid", "val"),
                                               ("test", "test")) if theirs in filename)
        if repo_id == "Salesforce/wikitext":
            return str(write_parquet(path, wikitext_rows(shared_docs("wikitext-2-raw", split))))
        if repo_id == "karpathy/tiny_shakespeare":
            return str(write_parquet(path, ["\n\n".join(shared_docs("tinyshakespeare", split)) + "\n"]))
        if repo_id == "roneneldan/TinyStories":
            stories = shared_docs("tinystories", "train")
            if "valid" in filename:
                stories = stories[:40]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(s + "\n<|endoftext|>\n" for s in stories), encoding="utf-8")
            return str(path)
        raise AssertionError(f"unexpected repo {repo_id}")


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    import huggingface_hub

    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


def read_out(directory: Path, split: str) -> list[str]:
    return [json.loads(line)["text"] for line in (directory / f"{split}.jsonl").open(encoding="utf-8")]


@needs_shared
def test_wikitext_download_gives_the_official_articles(hub, tmp_path):
    counts = download("wikitext-2-raw", tmp_path / "out", log=lambda _: None)
    assert hub.calls == [("Salesforce/wikitext", f"wikitext-2-raw-v1/{f}-00000-of-00001.parquet", "dataset", None)
                         for f in ("train", "validation", "test")]
    for split in ("train", "val", "test"):
        assert read_out(tmp_path / "out", split) == shared_docs("wikitext-2-raw", split)
    assert counts == {"val": 60, "test": 60, "train": 51} and (tmp_path / "out" / "SOURCE.md").exists()


@needs_shared
def test_tinyshakespeare_download_gives_paragraphs(hub, tmp_path):
    download("tinyshakespeare", tmp_path / "out", log=lambda _: None)
    assert {c[:2] for c in hub.calls} == {("karpathy/tiny_shakespeare", f"default/{s}/0000.parquet")
                                          for s in ("train", "validation", "test")}
    assert {c[3] for c in hub.calls} == {"refs/convert/parquet"}
    for split in ("train", "val", "test"):
        assert read_out(tmp_path / "out", split) == shared_docs("tinyshakespeare", split)


@needs_shared
def test_tinystories_download_halves_the_validation_file(hub, tmp_path):
    download("tinystories", tmp_path / "out", max_docs=30, log=lambda _: None)
    assert [c[1] for c in hub.calls] == ["TinyStories-train.txt", "TinyStories-valid.txt"]
    stories = shared_docs("tinystories", "train")
    assert read_out(tmp_path / "out", "train") == stories[:30]
    assert read_out(tmp_path / "out", "val") == stories[:20]
    assert read_out(tmp_path / "out", "test") == stories[20:40]


def test_an_existing_output_is_kept_unless_overwrite(hub, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "val.jsonl").write_text("mine\n")
    with pytest.raises(UserError, match="--out: already holds val.jsonl; pass --overwrite"):
        download("tinystories", tmp_path / "out")
    assert (tmp_path / "out" / "val.jsonl").read_text() == "mine\n" and not hub.calls


def test_a_failed_download_is_a_user_error_and_writes_nothing(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the Hub\nsecond line")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match=r"^roneneldan/TinyStories: could not download TinyStories-train.txt .*Hub\)$"):
        download("tinystories", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_download_refuses_an_unknown_name_and_bad_limits(tmp_path):
    run = [sys.executable, "-m", "mixtral_mlx", "data", "download"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run(run + ["imagenet", "--out", "x"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "invalid choice: 'imagenet'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(run + ["tinystories", "--out", "x", "--max-docs", "0"], cwd=tmp_path, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "--max-docs: must be a positive integer" in r.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- the conversions alone
def test_wikitext_heading_rules():
    rows = ["", " = Alpha = \n", "", " Text with a formula\n", " = 1 rad / s = \n", " more .\n", "",
            " = = Section = = \n", "", " Body .\n", "", " = Beta = \n", "", " B text\n"]
    assert wikitext_articles(rows) == [" = Alpha = \n Text with a formula\n = 1 rad / s = \n more .\n"
                                       " = = Section = = \n Body .", " = Beta = \n B text"]


def test_paragraphs_and_streamed_documents():
    assert paragraphs("\nA:\nline one\n\n\nB:\nline two\n \n") == ["A:\nline one", "B:\nline two"]
    chunks = ["one<|endo", "ftext|>\ntwo\n<|endoftext|>", "\n  \n<|endoftext|>three"]
    assert list(split_documents(chunks, "<|endoftext|>")) == ["one", "two", "three"]


def test_every_data_set_names_three_splits():
    for d in DATASETS.values():
        assert d.repo_id.count("/") == 1 and d.files
    assert set(DATASETS) == {"wikitext-2-raw", "tinyshakespeare", "tinystories"}
    assert datasets.SPLITS == ("train", "val", "test")
