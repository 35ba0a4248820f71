"""Text metrics for generated responses: ROUGE-1, ROUGE-L, METEOR and BLEU, overall and per category.

What each number is (all computed by the reference libraries, never re-implemented here):

- ``rouge1`` / ``rougeL``: rouge-score's F-measure with ``use_stemmer=True`` (its own tokenizer:
  lower-case, ASCII letters and digits, Porter stems), the mean over (prediction, reference) pairs, in
  [0, 1]. The public NextQuill code used Hugging Face ``evaluate``'s ``rouge``, which defaults to no
  stemming and reports a bootstrap median; here stemming is on and the mean is plain.
- ``meteor``: nltk's ``meteor_score`` (alpha 0.9, beta 3, gamma 0.5; exact, Porter-stem and
  WordNet-synonym matching), the mean over pairs, in [0, 1]. Both texts are tokenised by
  :func:`meteor_tokenize`: nltk's Punkt sentence splitter with its default (untrained) parameters, then
  ``NLTKWordTokenizer`` on each sentence. That is ``nltk.word_tokenize`` (what ``evaluate``'s ``meteor``
  calls) except that the trained English Punkt model, which lives in nltk_data and cannot be fetched
  offline, is replaced by the untrained splitter: they differ only around abbreviations ("Mr.", "e.g.").
- ``bleu``: sacreBLEU's corpus BLEU with its defaults (13a tokenizer, exp smoothing, one reference), 0-100.

WordNet (METEOR's synonyms) is found without any network access, in this order: the directory named by
``$NEXTQUILL_WORDNET_DIR``; nltk_data's ``corpora/wordnet`` or ``corpora/wordnet.zip`` (if someone
installed it); Debian's ``wordnet-base`` package (``apt-get install wordnet-base``, files in
``/usr/share/wordnet``). Without it METEOR is computed from exact and stem matches only, and the result
says so (``meteor_wordnet: false`` plus a warning). nltk's downloader is never called.
"""

from __future__ import annotations

import functools
import io
import os
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import nltk
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from nltk.tokenize import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktSentenceTokenizer
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

WORDNET_DIR_ENV = "NEXTQUILL_WORDNET_DIR"
# Debian / Ubuntu `wordnet-base`: WordNet 3.0 in Princeton's native `dict` format.
SYSTEM_WORDNET_DIRS: tuple[Path, ...] = (Path("/usr/share/wordnet"),)

METEOR_TOKENIZATION = (
    "nltk PunktSentenceTokenizer() (untrained) sentences, then NLTKWordTokenizer per sentence"
)
ROUGE_SETTINGS = "rouge-score RougeScorer(['rouge1', 'rougeL'], use_stemmer=True), F-measure, mean over pairs"

# WordNet 3.0's lexicographer files (lexnames(5WN)); nltk reads them from a `lexnames` file that its own
# data ships but Princeton's `dict` directory (and so Debian's package) does not.
_WORDNET30_LEXNAMES = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
_LEXNAME_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_WORDNET_REQUIRED_FILES = ("data.noun", "data.verb", "data.adj", "data.adv", "index.noun", "noun.exc")

_SENTENCE_SPLITTER = PunktSentenceTokenizer()
_WORD_TOKENIZER = NLTKWordTokenizer()
_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


class _WordNet30DictReader(WordNetCorpusReader):
    """nltk's WordNet reader over a Princeton WordNet 3.0 ``dict`` directory (e.g. Debian's wordnet-base)."""

    def open(self, file: str):
        if file == "lexnames" and not (Path(self.root.path) / "lexnames").exists():
            lines = (
                f"{i:02d}\t{name}\t{_LEXNAME_CATEGORY[name.split('.')[0]]}\n"
                for i, name in enumerate(_WORDNET30_LEXNAMES)
            )
            return io.StringIO("".join(lines))
        return super().open(file)

    def map_wn(self, version: str = "wordnet") -> None:
        # nltk maps synsets of another WordNet version onto nltk_data's `wordnet` corpus (for multilingual
        # data only), which would load that corpus; this directory is WordNet 3.0 itself, so no map is needed.
        return None


@functools.cache
def _read_wordnet_dir(directory: Path) -> WordNetCorpusReader:
    missing = [name for name in _WORDNET_REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a WordNet dictionary directory: it lacks {', '.join(missing)}. Point "
            f"${WORDNET_DIR_ENV} at a WordNet 3.0 `dict` directory (Debian: `apt-get install wordnet-base`, "
            "then /usr/share/wordnet), or unset it."
        )
    # nltk (>= 3.9.3) only opens files under the directories on nltk.data.path.
    if str(directory) not in nltk.data.path:
        nltk.data.path.append(str(directory))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        return _WordNet30DictReader(str(directory), None)


_NLTK_DATA_READERS: dict[str, WordNetCorpusReader] = {}


def _read_nltk_data_wordnet() -> WordNetCorpusReader | None:
    # nltk's `find` asked for what is not there leaves cycles (a local holds the LookupError, whose traceback
    # holds that frame), and frames hold their callers: `evaluate`'s model and memory-mapped split outlived
    # it until the garbage collector ran. So it is asked only where nltk_data has a WordNet folder, or the zip
    # `nltk.download("wordnet")` leaves (which nltk's own loader reads in place).
    for place, resource in (
        ("corpora/wordnet", "corpora/wordnet"),
        ("corpora/wordnet.zip", "corpora/wordnet.zip/wordnet/"),
    ):
        if not any(Path(p, place).exists() for p in nltk.data.path):
            continue
        try:
            root = nltk.data.find(resource)  # a lookup only: nltk never downloads here
        except LookupError:
            continue
        if str(root) not in _NLTK_DATA_READERS:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The multilingual functions are not available")
                _NLTK_DATA_READERS[str(root)] = WordNetCorpusReader(root, None)
        return _NLTK_DATA_READERS[str(root)]
    return None


def find_wordnet() -> tuple[WordNetCorpusReader | None, str | None]:
    """Find an installed WordNet without touching the network.

    Returns ``(reader, source)`` with ``source`` the directory or nltk_data path it was read from, or
    ``(None, None)`` when none is installed. Order: ``$NEXTQUILL_WORDNET_DIR``, nltk_data's
    ``corpora/wordnet`` (a folder, or the zip ``nltk.download`` leaves), then :data:`SYSTEM_WORDNET_DIRS`
    (Debian's wordnet-base).

    Raises:
        FileNotFoundError: ``$NEXTQUILL_WORDNET_DIR`` is set but is not a WordNet dictionary directory.
    """
    explicit = os.environ.get(WORDNET_DIR_ENV)
    if explicit:
        directory = Path(explicit).expanduser().resolve()
        return _read_wordnet_dir(directory), str(directory)
    reader = _read_nltk_data_wordnet()
    if reader is not None:
        return reader, str(reader.root)
    for directory in SYSTEM_WORDNET_DIRS:
        if (directory / "data.noun").is_file():
            return _read_wordnet_dir(directory.resolve()), str(directory)
    return None, None


class _NoSynonyms:
    """Stands in for WordNet in nltk's METEOR: no word has synonyms, so only exact and stem matches count."""

    def synsets(self, lemma: str) -> list:
        return []


def meteor_tokenize(text: str) -> list[str]:
    """Split ``text`` into METEOR's word tokens (see the module docstring; needs no nltk_data)."""
    return [
        token
        for sentence in _SENTENCE_SPLITTER.tokenize(text)
        for token in _WORD_TOKENIZER.tokenize(sentence)
    ]


def _check_inputs(
    predictions: Sequence[str], references: Sequence[str], categories: Sequence[str] | None
) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: they must pair up one to one."
        )
    if not predictions:
        raise ValueError("No predictions to score: predictions and references are empty.")
    if categories is not None and len(categories) != len(predictions):
        raise ValueError(
            f"{len(categories)} categories for {len(predictions)} predictions: give one per pair."
        )
    named = {"predictions": predictions, "references": references, "categories": categories or []}
    for name, values in named.items():
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise TypeError(
                    f"{name}[{i}] is {type(value).__name__} ({value!r}); every entry must be a str."
                )


def example_scores(predictions: Sequence[str], references: Sequence[str], wordnet: Any) -> dict[str, list]:
    """Per pair: {"rouge1", "rougeL"} F-measures and "meteor" (the metrics that average over pairs; BLEU is
    a corpus statistic and has none). `wordnet`: an nltk WordNet reader, or `_NoSynonyms()`."""
    rouge = [
        _ROUGE.score(target=ref, prediction=pred) for pred, ref in zip(predictions, references, strict=True)
    ]
    return {
        "rouge1": [r["rouge1"].fmeasure for r in rouge],
        "rougeL": [r["rougeL"].fmeasure for r in rouge],
        "meteor": [
            meteor_score([meteor_tokenize(ref)], meteor_tokenize(pred), wordnet=wordnet)
            for pred, ref in zip(predictions, references, strict=True)
        ],
    }


def _score_group(
    scores: dict[str, list],
    idx: Sequence[int],
    predictions: Sequence[str],
    references: Sequence[str],
    bleu: BLEU,
) -> dict[str, float]:
    """Means of the pairs `idx` of `scores`, and their corpus BLEU."""
    return {
        "count": len(idx),
        **{name: statistics.fmean(values[i] for i in idx) for name, values in scores.items()},
        "bleu": bleu.corpus_score([predictions[i] for i in idx], [[references[i] for i in idx]]).score,
    }


def score_predictions(
    predictions: Sequence[str],
    references: Sequence[str],
    categories: Sequence[str] | None = None,
    *,
    wordnet: WordNetCorpusReader | Literal["auto"] | None = "auto",
) -> dict[str, Any]:
    """Score generated texts against their references, overall and per category.

    Args:
        predictions: N generated texts.
        references: N ground-truth texts, paired with ``predictions`` by position.
        categories: optional N category names (e.g. the Amazon category of each example).
        wordnet: ``"auto"`` finds an installed WordNet with :func:`find_wordnet`; ``None`` scores METEOR
            without synonyms; or an nltk ``WordNetCorpusReader`` to use.

    Returns:
        ``{"overall": GROUP, "per_category": {name: GROUP}, "per_example": {"rouge1", "rougeL", "meteor":
        [N floats]}, "meteor_wordnet": bool, "meteor_wordnet_source": str | None, "warnings": [str],
        "settings": {...}}`` where GROUP is ``{"count", "rouge1", "rougeL", "meteor", "bleu"}`` (ROUGE and
        METEOR in [0, 1], BLEU in [0, 100]). ``per_category`` is empty without ``categories``.
        ``meteor_wordnet`` is false when METEOR had no synonyms; ``warnings`` then says so.

    Raises:
        ValueError: lengths differ, or there is nothing to score.
        TypeError: an entry is not a string (its list and index are named).
        FileNotFoundError: ``$NEXTQUILL_WORDNET_DIR`` names a directory without WordNet.
    """
    _check_inputs(predictions, references, categories)
    source = None
    if wordnet == "auto":
        wordnet, source = find_wordnet()
    elif wordnet is not None:
        source = str(wordnet.root)
    notes = []
    if wordnet is None:
        notes.append(
            "METEOR computed WITHOUT WordNet synonyms (exact and stem matches only), so it is lower than the "
            "standard METEOR. Install WordNet offline with `apt-get install wordnet-base` (Debian/Ubuntu) or "
            f"point ${WORDNET_DIR_ENV} at a WordNet 3.0 dict directory."
        )
        warnings.warn(notes[-1], RuntimeWarning, stacklevel=2)
    matcher = wordnet if wordnet is not None else _NoSynonyms()
    bleu = BLEU()

    scores = example_scores(predictions, references, matcher)
    per_category = {}
    if categories is not None:
        for name in sorted(set(categories)):
            idx = [i for i, c in enumerate(categories) if c == name]
            per_category[name] = _score_group(scores, idx, predictions, references, bleu)
    return {
        "overall": _score_group(scores, range(len(predictions)), predictions, references, bleu),
        "per_category": per_category,
        "per_example": scores,
        "meteor_wordnet": wordnet is not None,
        "meteor_wordnet_source": source,
        "warnings": notes,
        "settings": {
            "rouge": ROUGE_SETTINGS,
            "meteor_tokenization": METEOR_TOKENIZATION,
            "bleu_signature": str(bleu.get_signature()),
        },
    }
