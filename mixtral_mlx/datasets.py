"""Public data sets from the Hugging Face Hub, written as this package's jsonl splits.

`download(name, out_dir)` fetches the files through huggingface_hub (cached there) and
converts them into `train.jsonl`, `val.jsonl` and `test.jsonl` of `{"text": ...}` lines,
one document per line:

* wikitext-2-raw: Salesforce/wikitext, the raw (no <unk>) WikiText-2 parquet files; the
  rows are lines of text, joined into one document per article.
* tinyshakespeare: karpathy/tiny_shakespeare (its parquet conversion); each split is one
  text, cut into paragraphs at blank lines.
* tinystories: roneneldan/TinyStories, the story text files (`<|endoftext|>` between
  stories); its validation file is halved into val and test, as it has no test split.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from .errors import UserError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PublicDataset:
    name: str
    repo_id: str
    files: dict[str, str]  # our name for a file -> its path in the repo
    convert: Callable[[dict[str, Path], int | None], dict[str, list[str]]]  # files -> documents per split
    revision: str | None = None
    about: str = ""


# ---------------------------------------------------------------------- conversions
_ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_articles(rows: Iterable[str]) -> list[str]:
    """WikiText rows (a line of text each, "" between blocks) -> one document per article.

    An article starts at a top-level heading (" = Title = ", not " = = Section = = ") that
    stands between blank rows; a formula line inside a paragraph can look like a heading
    but has text around it. A document is its non-blank lines joined by newlines.
    """
    lines = [r[:-1] if r.endswith("\n") else r for r in rows]
    articles: list[list[str]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        blank_around = (i == 0 or not lines[i - 1].strip()) and (i + 1 == len(lines) or not lines[i + 1].strip())
        if (_ARTICLE_TITLE.match(line) and blank_around) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["\n".join(a) for a in articles]


def paragraphs(text: str) -> list[str]:
    """Text cut at blank lines, each paragraph without its surrounding newlines."""
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def split_documents(chunks: Iterable[str], separator: str) -> Iterator[str]:
    """Documents between `separator`s in a text read in chunks (so a 2 GB file streams)."""
    rest = ""
    for chunk in chunks:
        parts = (rest + chunk).split(separator)
        rest = parts.pop()
        for p in parts:
            if p.strip():
                yield p.strip()
    if rest.strip():
        yield rest.strip()


def _read_chunks(path: Path, size: int = 1 << 24) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        yield from iter(lambda: f.read(size), "")


def _parquet_column(path: Path, column: str = "text") -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading this data set's parquet files needs pyarrow: pip install pyarrow") from None
    return pq.read_table(path, columns=[column]).column(column).to_pylist()


def _limit(docs: Iterable[str], max_docs: int | None) -> list[str]:
    out = []
    for d in docs:
        if max_docs is not None and len(out) >= max_docs:
            break
        out.append(d)
    return out


def _convert_wikitext(files: dict[str, Path], max_docs: int | None) -> dict[str, list[str]]:
    return {s: _limit(wikitext_articles(_parquet_column(files[s])), max_docs) for s in SPLITS}


def _convert_shakespeare(files: dict[str, Path], max_docs: int | None) -> dict[str, list[str]]:
    return {s: _limit(paragraphs("".join(_parquet_column(files[s]))), max_docs) for s in SPLITS}


def _convert_tinystories(files: dict[str, Path], max_docs: int | None) -> dict[str, list[str]]:
    stories = list(split_documents(_read_chunks(files["valid"]), "<|endoftext|>"))
    half = len(stories) // 2
    return {"train": _limit(split_documents(_read_chunks(files["train"]), "<|endoftext|>"), max_docs),
            "val": _limit(stories[:half], max_docs), "test": _limit(stories[half:], max_docs)}


DATASETS = {d.name: d for d in [
    PublicDataset("wikitext-2-raw", "Salesforce/wikitext",
                  {s: f"wikitext-2-raw-v1/{f}-00000-of-00001.parquet"
                   for s, f in (("train", "train"), ("val", "validation"), ("test", "test"))},
                  _convert_wikitext, about="WikiText-2 (raw), Wikipedia articles, CC BY-SA"),
    PublicDataset("tinyshakespeare", "karpathy/tiny_shakespeare",
                  {s: f"default/{f}/0000.parquet" for s, f in (("train", "train"), ("val", "validation"),
                                                               ("test", "test"))},
                  _convert_shakespeare, revision="refs/convert/parquet",
                  about="Tiny Shakespeare, about 1 MB of Shakespeare's plays, public domain"),
    PublicDataset("tinystories", "roneneldan/TinyStories",
                  {"train": "TinyStories-train.txt", "valid": "TinyStories-valid.txt"},
                  _convert_tinystories, about="TinyStories, synthetic children's stories, CDLA-Sharing-1.0 "
                                              "(the train file is about 1.9 GB)"),
]}


# ---------------------------------------------------------------------- download
def fetch(dataset: PublicDataset) -> dict[str, Path]:
    """Download (or find in the Hugging Face cache) each of the data set's files."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    paths = {}
    for key, filename in dataset.files.items():
        try:
            paths[key] = Path(huggingface_hub.hf_hub_download(
                dataset.repo_id, filename, repo_type="dataset", revision=dataset.revision))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
            first_line = f"{type(e).__name__}: {e}".splitlines()[0]
            raise UserError(f"could not download {filename} from the Hugging Face Hub ({first_line})",
                            file=dataset.repo_id) from None
    return paths


def download(name: str, out_dir: str | Path, max_docs: int | None = None, overwrite: bool = False,
             log: Callable[[str], None] = print) -> dict[str, int]:
    """Fetch a public data set and write it as jsonl splits; returns documents per split."""
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r} (choose from {', '.join(sorted(DATASETS))})", field="name")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("is a file, not a directory", file=out_dir, field="--out")
    existing = [s for s in SPLITS if (out_dir / f"{s}.jsonl").exists()]
    if existing and not overwrite:
        raise UserError(f"already holds {existing[0]}.jsonl; pass --overwrite to replace it", file=out_dir,
                        field="--out")
    dataset = DATASETS[name]
    docs = dataset.convert(fetch(dataset), max_docs)
    write_splits(out_dir, docs, source=f"{dataset.about}.\nFrom the Hugging Face Hub dataset `{dataset.repo_id}`"
                 + (f" (revision {dataset.revision})" if dataset.revision else "")
                 + f", files {', '.join(dataset.files.values())}; converted by `mixtral-mlx data download {name}`"
                 + f" on {date.today().isoformat()}.")
    counts = {s: len(d) for s, d in docs.items()}
    log(f"{name}: " + ", ".join(f"{s} {n:,} documents" for s, n in counts.items()) + f" -> {out_dir}")
    return counts


def write_splits(out_dir: Path, docs: dict[str, list[str]], source: str) -> None:
    """Write `{"text": doc}` lines per split; each file appears whole or not at all."""
    for split, items in docs.items():
        if not items:
            raise UserError(f"the {split} split came out empty", file=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = {s: out_dir / f".{s}.jsonl.tmp-{os.getpid()}" for s in docs}
    try:
        for split, items in docs.items():
            with open(tmp[split], "w", encoding="utf-8") as f:
                for d in items:
                    f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        for split in docs:
            os.replace(tmp[split], out_dir / f"{split}.jsonl")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    (out_dir / "SOURCE.md").write_text(source + "\n")
