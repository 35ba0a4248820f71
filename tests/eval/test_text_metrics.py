"""nextquill_jax.eval.text_metrics against rouge-score, sacreBLEU and nltk called directly in the test."""

from __future__ import annotations

import statistics
import types

import nltk
import pytest
import sacrebleu
from nltk.tokenize import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktSentenceTokenizer
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer

from nextquill_jax.eval import text_metrics as metrics

# (prediction, reference, category). Chosen to exercise: WordNet synonyms whose Porter stem is the word
# itself (car/auto: nltk matches synonyms after stemming), stems (loved/loving), several sentences,
# punctuation, an empty prediction, non-ASCII text, and an exact match.
PAIRS = [
    (
        "The auto was fast and I loved it. Great buy!",
        "The car was fast, and I am loving it. A great buy.",
        "Books",
    ),
    ("A dull film. The plot drags.", "A dull movie; the plot drags on and on.", "Movies_and_TV"),
    ("", "Nothing was generated for this one.", "Books"),
    (
        "Café music, très bien: smooth jazz all night.",
        "Smooth jazz all night long, a café classic.",
        "CDs_and_Vinyl",
    ),
    ("Exactly the same words here.", "Exactly the same words here.", "Movies_and_TV"),
    ("This big novel felt large and slow.", "The novel is big, slow and far too large.", "Books"),
]
PREDICTIONS = [p for p, _, _ in PAIRS]
REFERENCES = [r for _, r, _ in PAIRS]
CATEGORIES = [c for _, _, c in PAIRS]


class NoSynonyms:
    def synsets(self, lemma: str) -> list:
        return []


def tokens(text: str) -> list[str]:
    """The documented METEOR tokenisation: untrained Punkt sentences, then nltk's Treebank-style words."""
    splitter, words = PunktSentenceTokenizer(), NLTKWordTokenizer()
    return [t for s in splitter.tokenize(text) for t in words.tokenize(s)]


def reference_scores(preds: list[str], refs: list[str], wordnet) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)]
    return {
        "count": len(preds),
        "rouge1": statistics.mean(s["rouge1"].fmeasure for s in rouge),
        "rougeL": statistics.mean(s["rougeL"].fmeasure for s in rouge),
        "meteor": statistics.mean(
            meteor_score([tokens(r)], tokens(p), wordnet=wordnet) for p, r in zip(preds, refs, strict=True)
        ),
        "bleu": sacrebleu.corpus_bleu(preds, [refs]).score,
    }


def assert_group_equal(got: dict, want: dict) -> None:
    assert got["count"] == want["count"]
    for key in ("rouge1", "rougeL", "meteor", "bleu"):
        assert got[key] == pytest.approx(want[key], rel=0, abs=1e-9), key


@pytest.fixture(scope="module")
def system_wordnet():
    reader, _ = metrics.find_wordnet()
    if reader is None:
        pytest.skip("no WordNet installed: `apt-get install wordnet-base` (see README setup)")
    return reader


def test_values_equal_the_reference_libraries_without_wordnet():
    with pytest.warns(RuntimeWarning, match="WITHOUT WordNet"):
        got = metrics.score_predictions(PREDICTIONS, REFERENCES, wordnet=None)
    assert_group_equal(got["overall"], reference_scores(PREDICTIONS, REFERENCES, NoSynonyms()))
    assert got["per_category"] == {}
    assert got["overall"]["bleu"] > 1.0  # on the 0-100 scale, and not degenerate
    assert 0.0 < got["overall"]["meteor"] < 1.0


def test_values_equal_the_reference_libraries_with_wordnet(system_wordnet):
    got = metrics.score_predictions(PREDICTIONS, REFERENCES, CATEGORIES)
    assert got["meteor_wordnet"] is True and got["warnings"] == []
    assert got["meteor_wordnet_source"]
    assert_group_equal(got["overall"], reference_scores(PREDICTIONS, REFERENCES, system_wordnet))
    # The synonyms were used: car/auto matches only through WordNet.
    first = PAIRS[0]
    given = metrics.score_predictions([first[0]], [first[1]], wordnet=system_wordnet)
    with_syn = given["overall"]["meteor"]
    assert given["meteor_wordnet_source"] == str(system_wordnet.root)  # a reader passed in names its place
    with pytest.warns(RuntimeWarning):
        without = metrics.score_predictions([first[0]], [first[1]], wordnet=None)["overall"]["meteor"]
    assert with_syn > without + 0.01


def test_per_category_scores_each_subset():
    """Grouping needs no WordNet (it skipped without one): scored without synonyms, against the references."""
    with pytest.warns(RuntimeWarning, match="WITHOUT WordNet"):
        got = metrics.score_predictions(PREDICTIONS, REFERENCES, CATEGORIES, wordnet=None)
    assert list(got["per_category"]) == ["Books", "CDs_and_Vinyl", "Movies_and_TV"]
    for name, group in got["per_category"].items():
        idx = [i for i, c in enumerate(CATEGORIES) if c == name]
        want = reference_scores([PREDICTIONS[i] for i in idx], [REFERENCES[i] for i in idx], NoSynonyms())
        assert_group_equal(group, want)
    assert sum(g["count"] for g in got["per_category"].values()) == len(PAIRS)


def test_wordnet_reader_holds_wordnet_30(system_wordnet):
    # Facts of Princeton WordNet 3.0 (wnstats(7WN): 3,621 adverb synsets; lexnames(5WN) file numbers).
    assert sum(1 for _ in system_wordnet.all_synsets("r")) == 3621
    assert system_wordnet.synset("car.n.01").lemma_names() == [
        "car",
        "auto",
        "automobile",
        "machine",
        "motorcar",
    ]
    assert system_wordnet.synset("dog.n.01").lexname() == "noun.animal"
    assert system_wordnet.synset("run.v.01").lexname() == "verb.motion"
    assert system_wordnet.synsets("dogs")[0].name() == "dog.n.01"  # morphy uses the exception lists


def test_missing_wordnet_is_flagged_not_silent(monkeypatch, tmp_path):
    monkeypatch.delenv(metrics.WORDNET_DIR_ENV, raising=False)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(metrics, "SYSTEM_WORDNET_DIRS", (tmp_path,))
    assert metrics.find_wordnet() == (None, None)
    with pytest.warns(RuntimeWarning, match="WITHOUT WordNet"):
        got = metrics.score_predictions(PREDICTIONS, REFERENCES, CATEGORIES)
    assert got["meteor_wordnet"] is False
    assert got["meteor_wordnet_source"] is None
    assert any("WITHOUT WordNet" in w for w in got["warnings"])
    assert_group_equal(got["overall"], reference_scores(PREDICTIONS, REFERENCES, NoSynonyms()))


def test_a_missing_wordnet_leaves_no_cycle_holding_the_callers(monkeypatch, tmp_path):
    """nltk's failed lookup left reference cycles holding every caller's frame: `evaluate`'s model and its
    memory-mapped split stayed alive after it returned, until the garbage collector ran."""
    import gc
    import weakref

    monkeypatch.delenv(metrics.WORDNET_DIR_ENV, raising=False)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(metrics, "SYSTEM_WORDNET_DIRS", (tmp_path,))

    class Held:
        """Stands in for what a caller's frame holds (a model)."""

    def caller() -> weakref.ref:
        held = Held()
        assert metrics.find_wordnet() == (None, None)
        return weakref.ref(held)

    gc.collect()
    gc.disable()
    try:
        held = caller()
        assert held() is None, "a cycle holds the caller's frame"
    finally:
        gc.enable()


@pytest.mark.parametrize("layout", ["corpora/wordnet/", "corpora/wordnet.zip"])
def test_wordnet_in_nltk_data_is_found_there(monkeypatch, tmp_path, layout):
    """nltk is asked only where nltk_data could hold WordNet (a `corpora/wordnet` folder or zip): the check
    must not hide one that is there."""
    import zipfile

    place = tmp_path / layout
    if layout.endswith("/"):
        place.mkdir(parents=True)
    else:
        place.parent.mkdir(parents=True)
        with zipfile.ZipFile(place, "w") as archive:
            archive.writestr("wordnet/", "")  # as nltk's downloader writes it, with the folder entry
    monkeypatch.delenv(metrics.WORDNET_DIR_ENV, raising=False)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "elsewhere"), str(tmp_path)])
    monkeypatch.setattr(metrics, "SYSTEM_WORDNET_DIRS", ())
    monkeypatch.setattr(metrics, "_NLTK_DATA_READERS", {})
    monkeypatch.setattr(metrics, "WordNetCorpusReader", lambda root, omw: types.SimpleNamespace(root=root))
    _, source = metrics.find_wordnet()
    assert source is not None and source.startswith(str(place).rstrip("/")), source


def test_wordnet_dir_env_without_wordnet_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv(metrics.WORDNET_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{metrics.WORDNET_DIR_ENV}.*wordnet-base"):
        metrics.find_wordnet()


def test_wordnet_dir_env_comes_before_nltk_data(monkeypatch, tmp_path):
    """`$NEXTQUILL_WORDNET_DIR` is the user's explicit choice: it wins over a WordNet in nltk_data."""
    (tmp_path / "nltk" / "corpora" / "wordnet").mkdir(parents=True)
    chosen = tmp_path / "chosen"
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk")])
    monkeypatch.setattr(metrics, "_NLTK_DATA_READERS", {})
    monkeypatch.setattr(metrics, "WordNetCorpusReader", lambda root, omw: types.SimpleNamespace(root=root))
    monkeypatch.setattr(metrics, "_read_wordnet_dir", lambda directory: types.SimpleNamespace(root=directory))
    monkeypatch.delenv(metrics.WORDNET_DIR_ENV, raising=False)
    assert metrics.find_wordnet()[1].startswith(str(tmp_path / "nltk"))  # nltk_data's, without the setting
    monkeypatch.setenv(metrics.WORDNET_DIR_ENV, str(chosen))
    assert metrics.find_wordnet()[1] == str(chosen.resolve())


def test_wordnet_dir_env_is_used(monkeypatch):
    system_dir = metrics.SYSTEM_WORDNET_DIRS[0]
    if not (system_dir / "data.noun").is_file():
        pytest.skip(f"Debian's wordnet-base is not installed ({system_dir}): `apt-get install wordnet-base`")
    monkeypatch.setenv(metrics.WORDNET_DIR_ENV, str(system_dir))
    reader, source = metrics.find_wordnet()
    assert source == str(system_dir)
    assert reader.synset("car.n.01").lemma_names()[1] == "auto"


def test_meteor_tokenize_splits_sentences_and_punctuation():
    # Written out by hand: what nltk.word_tokenize gives for these sentences.
    assert metrics.meteor_tokenize("I loved it. The plot, sadly, dragged!") == [
        "I", "loved", "it", ".", "The", "plot", ",", "sadly", ",", "dragged", "!",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("preds", "refs", "cats", "error", "match"),
    [
        (["a"], ["a", "b"], None, ValueError, "1 predictions but 2 references"),
        ([], [], None, ValueError, "No predictions"),
        (["a", "b"], ["a", "b"], ["x"], ValueError, "1 categories for 2 predictions"),
        (["a", "b"], ["a", None], None, TypeError, r"references\[1\] is NoneType"),
        (["a"], ["a"], [3], TypeError, r"categories\[0\] is int"),
    ],
)
def test_bad_input_is_a_clear_error(preds, refs, cats, error, match):
    with pytest.raises(error, match=match):
        metrics.score_predictions(preds, refs, cats, wordnet=None)
