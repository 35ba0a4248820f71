"""Readers: every format's fixture, the DPL protocol against an independent statement of it, and bad input."""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nextquill_jax.data.config import DataConfig
from nextquill_jax.data.prepare import prepare
from nextquill_jax.data.sources.read import read_records, split_from_name
from nextquill_jax.data.sources.records import FINITE_FIX, DataError, IssueLog
from nextquill_jax.data.templates import load_template
from tests.data.dpl_reference import reference_dpl
from tests.shared import FIXTURES

AMAZON = FIXTURES / "amazon2023"
REFERENCE_T = dict(
    min_desc=100,
    max_desc=2000,
    min_text=200,
    min_item_users=2,
    min_user_reviews=5,
    max_user_reviews=500,
    targets=3,
    min_profile_item_users=2,
    min_profile_reviews=2,
)


def _read(cfg: DataConfig, template: str | None = None):
    log = IssueLog(on_error=cfg.on_error, max_shown=cfg.max_errors_shown)
    records = read_records(cfg, load_template(template or cfg.template), log)
    log.raise_if_failed()
    return records, log


def _topic_writing_cfg(tw: Path) -> DataConfig:
    """LaMP topic writing from the directory `tw`: its dev questions, golds in its dev outputs."""
    return DataConfig(
        format="lamp",
        template="lamp_topic_writing",
        sources=[str(tw / "dev_questions.json")],
        meta=[str(tw / "dev_outputs.json")],
    )


def _amazon_cfg(
    thresholds, reviews: Path = AMAZON, meta: Path = AMAZON, ext: str = "jsonl", **kw
) -> DataConfig:
    """Category Books from `reviews`/Books.<ext> with its metadata `meta`/meta_Books.<ext>."""
    return DataConfig(
        format="amazon2023",
        sources=[str(reviews / f"Books.{ext}")],
        meta=[str(meta / f"meta_Books.{ext}")],
        **{**thresholds, **kw},
    )


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _as_dpl(record):
    """A record in the DPL row layout, for comparison with the reference."""

    def review(fields, ts):
        return {
            "rating": fields["rating"],
            "title": fields["title"],
            "text": fields["text"],
            "item": (fields["item_title"], fields["item_description"]),
            "timestamp": ts,
        }

    data = {**record.context, "text": record.target}
    return {
        "user_id": record.user_id,
        "split": record.split,
        "profile": [review(e.fields, e.timestamp) for e in record.history],
        "data": {k: v for k, v in review(data, None).items() if k != "timestamp"},
    }


def _reference_as_dpl(out, items):
    by_asin = {i["asin"]: (i["title"], i["description"]) for i in items}

    def review(r, with_ts=True):
        d = {"rating": r["rating"], "title": r["title"], "text": r["text"], "item": by_asin[r["asin"]]}
        return d | ({"timestamp": float(r["timestamp"])} if with_ts else {})

    return [
        {
            "user_id": row["user_id"],
            "split": split,
            "profile": [review(r) for r in row["profile"]],
            "data": review(row["data"], with_ts=False),
        }
        for split, rows in out.items()
        for row in rows
    ]


def _key(d):
    return (d["split"], d["user_id"], d["data"]["text"])


def test_amazon2023_matches_the_reference_protocol(small_dpl):
    records, _ = _read(_amazon_cfg(small_dpl))
    out, items = reference_dpl(_rows(AMAZON / "Books.jsonl"), _rows(AMAZON / "meta_Books.jsonl"), REFERENCE_T)
    ours = sorted((_as_dpl(r) for r in records), key=_key)
    ref = sorted(_reference_as_dpl(out, items), key=_key)
    assert len(ours) == 12 and ours == ref
    assert {r.category for r in records} == {"Books"}
    # Per user: targets 1..n-2 train, then val, then test; each history = everything before the target.
    by_user = {}
    for r in records:
        by_user.setdefault(r.user_id, []).append(r)
    assert sorted(by_user) == ["U1", "U2", "U3", "U4"]  # U5 has 3 reviews < 5
    for user_records in by_user.values():
        assert [r.split for r in user_records] == ["train", "val", "test"]
        lengths = [len(r.history) for r in user_records]
        assert lengths == [lengths[0], lengths[0] + 1, lengths[0] + 2]
        assert user_records[1].history[-1].fields["text"] == user_records[0].target


def test_amazon2023_user_review_bounds_are_inclusive_as_the_reference_states_them(small_dpl):
    """`dpl_min_user_reviews <= n <= dpl_max_user_reviews` (n: a user's newest unique reviews; U2 and U4
    have 7 in the fixture, U1 and U3 8): bounds 7 and 8 keep all four (the default maximum, 500, is reached
    by no fixture user, so the upper bound was never exercised); one bound past them drops users, and the
    items they alone reviewed, and with them the rest (min_item_users 2), as the reference does."""
    for low, high, kept in ((7, 8, 4), (7, 7, 0), (8, 8, 0)):
        thresholds = {**small_dpl, "dpl_min_user_reviews": low, "dpl_max_user_reviews": high}
        records, _ = _read(_amazon_cfg(thresholds))
        reference = {**REFERENCE_T, "min_user_reviews": low, "max_user_reviews": high}
        out, items = reference_dpl(
            _rows(AMAZON / "Books.jsonl"), _rows(AMAZON / "meta_Books.jsonl"), reference
        )
        assert sorted((_as_dpl(r) for r in records), key=_key) == sorted(
            _reference_as_dpl(out, items), key=_key
        )
        assert len({r.user_id for r in records}) == kept, (low, high)


# Thresholds the random files below sit on: lengths one under, at and one over each bound.
EDGE_T = dict(
    min_desc=20, max_desc=40, min_text=30, min_item_users=3, min_user_reviews=5, max_user_reviews=9,
    targets=3, min_profile_item_users=2, min_profile_reviews=3,
)  # fmt: skip
# The reference's names of the `DataConfig.dpl_*` settings that differ from them.
DPL_NAMES = {
    "min_desc": "min_description_chars", "max_desc": "max_description_chars", "min_text": "min_review_chars",
    "targets": "num_targets",
}  # fmt: skip


def _edge_rows(seed: int) -> tuple[list[dict], list[dict]]:
    """Raw review and metadata rows on `EDGE_T`'s bounds. Random users over random items: descriptions of
    19-21 and 39-41 characters (some behind the "Product Description" marker), texts of 29-31, a user's
    second review of an item, a text repeated with its spaces doubled or not. Beside them, users placed on
    the bounds: one with `max_user_reviews` reviews; one with a review more, whose texts are that many only
    when two that differ in whitespace alone count as two (the raw texts, as the protocol counts them); an
    item three users review (`min_item_users`) and one that two users review three times, each the oldest
    review of its users (so in their profiles). Timestamps are distinct."""
    rng = np.random.default_rng(seed)
    text_of = lambda n: "".join(rng.choice(list("abcdefgh ")) for _ in range(n - 2)).join("xy")  # n chars
    anchors, rare = 10, [16, 17]  # items 0-9 and the rare ones have valid descriptions
    metas = []
    for i in range(18):
        size = 30 if i < anchors or i in rare else int(rng.choice([19, 20, 21, 30, 39, 40, 41]))
        parts = [text_of(size)] if i % 5 else ["Product Description", text_of(size)]
        meta = {"main_category": "Books", "title": f"Item {i}", "description": parts, "rating_number": 3}
        metas.append(meta | {"categories": ["Books"], "parent_asin": f"B{i:09d}"})
    asin = lambda i: f"B{i:09d}"
    reviews, stamp = [], 1_500_000_000_000

    def write(user: str, items: list[int], texts: list[str] | None = None) -> None:
        nonlocal stamp
        for k, item in enumerate(items):
            stamp += int(rng.integers(1, 10**6))
            text = text_of(30) if texts is None else texts[k]
            row = {"rating": float(rng.integers(1, 6)), "title": f"{user}-{k}", "text": text}
            reviews.append(row | {"asin": asin(item), "parent_asin": asin(item), "user_id": user})
            reviews[-1]["timestamp"] = stamp

    popularity = rng.dirichlet(np.full(16, 2.0))
    for u in range(60):
        items, texts = [], []
        for _ in range(int(rng.integers(7, 17))):
            item = int(rng.choice(16, p=popularity))
            if items and rng.random() < 0.12:  # a second review of an item reviewed before
                item = items[int(rng.integers(len(items)))]
            text = text_of(int(rng.choice([29, 30, 31, 40, 40])))
            if texts and rng.random() < 0.15:  # an earlier text again, its spaces doubled or not
                earlier = texts[int(rng.integers(len(texts)))]
                text = earlier.replace(" ", "  ", 1) if rng.random() < 0.5 else earlier
            items.append(item)
            texts.append(text)
        write(f"U{u}", items, texts)
    write("E_max", list(range(9)))
    texts = [text_of(30).replace("y", " y") for _ in range(9)]  # each has a space to double
    write("E_spaces", list(range(10)), [*texts, texts[3].replace(" ", "  ", 1)])
    for user in ("E_r1a", "E_r1b", "E_r1c"):
        write(user, [16, *range(1, 8)])
    write("E_r2a", [17, 17, *range(2, 9)])
    write("E_r2b", [17, *range(2, 9)])
    return reviews, metas


@pytest.mark.parametrize("seed", range(3))
def test_amazon2023_on_its_bounds_matches_the_reference_protocol(tmp_path, seed):
    """Random files on every bound of the protocol (`_edge_rows`) against `reference_dpl`: an inclusive
    bound read as exclusive, a user count of rows rather than of users, a filter run once rather than to a
    fixed point, a repeat told by its collapsed text too early, each changes who and what is kept."""
    reviews, metas = _edge_rows(seed)
    for name, rows in (("Books.jsonl", reviews), ("meta_Books.jsonl", metas)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    thresholds = {f"dpl_{DPL_NAMES.get(key, key)}": value for key, value in EDGE_T.items()}
    records, _ = _read(_amazon_cfg(thresholds, tmp_path, tmp_path))
    out, items = reference_dpl(reviews, metas, EDGE_T)
    reference = sorted(_reference_as_dpl(out, items), key=_key)
    assert len(reference) >= 30  # ten users or more: the bounds decide something
    users = {row["user_id"] for row in out["test"]}  # the placed users fall as placed
    assert {"E_max", "E_r1a", "E_r2a"} <= users and "E_spaces" not in users, users
    in_profiles = {review["asin"] for row in out["test"] for review in row["profile"]}
    assert f"B{16:09d}" in in_profiles and f"B{17:09d}" not in in_profiles
    assert sorted((_as_dpl(r) for r in records), key=_key) == reference


def test_amazon2023_hand_checked_details(small_dpl):
    records, _ = _read(_amazon_cfg(small_dpl))
    u1_test = next(r for r in records if r.user_id == "U1" and r.split == "test")
    # U1 reviewed "A Map of Bells" twice; the newer review ("Second look") is kept, the older one is gone.
    assert u1_test.context["title"] == "Second look" and u1_test.context["rating"] == 2.0
    assert all(e.fields["item_title"] != "A Map of Bells" for e in u1_test.history)
    # Item 2's description starts with a "Product Description" marker entry, which is dropped.
    meta = {m["parent_asin"]: m for m in _rows(AMAZON / "meta_Books.jsonl")}
    assert meta["B000000002"]["description"][0] == "Product Description"
    winter = next(e for r in records for e in r.history if e.fields["item_title"] == "Winter Orchard")
    assert winter.fields["item_description"] == " ".join(meta["B000000002"]["description"][1:])
    # U3's newest review repeats an older text up to whitespace: collapsed, and the older copy removed.
    u3_texts = [e.fields["text"] for r in records if r.user_id == "U3" for e in r.history] + [
        r.target for r in records if r.user_id == "U3"
    ]
    same = next(r for r in _rows(AMAZON / "Books.jsonl") if r["title"] == "Same words again")["text"]
    assert same in u3_texts and all("  " not in t and "\n" not in t for t in u3_texts)
    assert not any(e.fields["title"] == "Same words again" for r in records for e in r.history)


def test_amazon2023_counts_every_dropped_review_and_item(small_dpl):
    records, log = _read(_amazon_cfg(small_dpl))
    assert dict(log.dropped) == {
        # items (meta rows): 14 read, 9 kept
        "item_description_length": 2,  # a 14-character blurb; a description that is only the marker entry
        "item_no_categories": 1,
        "item_no_rating_count": 1,
        "item_no_title": 1,
        # reviews: 40 read
        "review_text_short": 1,
        "review_no_rating": 1,
        "review_no_title": 1,
        "review_item_filtered": 2,  # on the short-description and the no-categories items
        "review_user_review_count": 3,  # U5's three reviews
        "review_item_too_few_users": 1,  # only U1 reviewed "A Lonely Book"
        "review_duplicate_item": 1,  # U1's older review of "A Map of Bells"
        "review_duplicate_text": 1,  # U3's older copy of the same text
        "review_profile_item_too_few_users": 1,
    }
    assert not log.errors
    # Nothing lost without a count: a user's test record holds all their kept reviews (history + target).
    kept_reviews = sum(len(r.history) + 1 for r in records if r.split == "test")
    dropped_reviews = sum(n for k, n in log.dropped.items() if k.startswith("review_"))
    assert log.read[str(AMAZON / "Books.jsonl")] == 40 == dropped_reviews + kept_reviews


def test_amazon2023_drops_and_counts_a_long_review_of_whitespace_alone(tmp_path, small_dpl):
    """250 spaces and newlines pass the protocol's raw length check (>= 200 characters) and collapse to an
    empty text: it was kept, as U1's newest review an empty test target. It is dropped and counted."""
    rows = _rows(AMAZON / "Books.jsonl")
    newest = max(r["timestamp"] for r in rows)
    blank = {**rows[0], "title": "Blank", "text": " \n" * 125, "timestamp": newest + 1}
    (tmp_path / "Books.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, blank]))
    shutil.copy(AMAZON / "meta_Books.jsonl", tmp_path)
    cfg = _amazon_cfg(small_dpl, tmp_path, tmp_path)
    records, log = _read(cfg)
    expected, expected_log = _read(_amazon_cfg(small_dpl))
    assert [dataclasses.replace(r, source="") for r in records] == [
        dataclasses.replace(r, source="") for r in expected
    ]
    assert log.dropped == {**expected_log.dropped, "review_text_blank": 1}


def _reviews_of(records) -> list[dict]:
    """The fields of every review the records hold (targets and history entries)."""
    return [r.context for r in records] + [e.fields for r in records for e in r.history]


def _with_reference(records, reviews: list[dict], metas: list[dict], **t) -> tuple[list[dict], list[dict]]:
    """`records` and the rows `reference_dpl` builds of `reviews` and `metas` (`t` changing the thresholds
    of `REFERENCE_T`), both in the DPL layout and in one order."""
    out, items = reference_dpl(reviews, metas, {**REFERENCE_T, **t})
    return sorted(map(_as_dpl, records), key=_key), sorted(_reference_as_dpl(out, items), key=_key)


def test_amazon2023_drops_a_review_rated_0_as_one_without_a_rating(tmp_path, small_dpl):
    """The protocol keeps a review with a rating (`r["rating"]` true, as the reference states it): 0, below
    Amazon's 1-5 stars, is none, as null is. U1's review of The Glass Harbor rated 0 is dropped and counted
    beside the fixture's review without a rating."""
    rows = _rows(AMAZON / "Books.jsonl")
    assert (rows[0]["user_id"], rows[0]["title"], rows[0]["rating"]) == ("U1", "U1 on The Glass Harbor", 1.0)
    rows[0]["rating"] = 0
    (tmp_path / "Books.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, log = _read(_amazon_cfg(small_dpl, tmp_path))
    ours, reference = _with_reference(records, rows, _rows(AMAZON / "meta_Books.jsonl"))
    assert ours == reference
    rated_1, _ = _read(_amazon_cfg(small_dpl))
    assert "U1 on The Glass Harbor" in {review["title"] for review in _reviews_of(rated_1)}
    assert "U1 on The Glass Harbor" not in {review["title"] for review in _reviews_of(records)}
    assert log.dropped["review_no_rating"] == 2


def test_amazon2023_integer_ratings_give_the_same_records_as_float_ones(tmp_path, small_dpl):
    """A rating written 5 rather than 5.0 prints as 5.0 in the prompts (`{rating}`), as the `dpl` reader and
    the public code's data give it: the records of the file with integer ratings are those of the fixture's,
    ratings floats."""
    rows = _rows(AMAZON / "Books.jsonl")
    as_int = [{**r, "rating": None if r["rating"] is None else int(r["rating"])} for r in rows]
    assert any(type(r["rating"]) is int for r in as_int)
    (tmp_path / "Books.jsonl").write_text("".join(json.dumps(r) + "\n" for r in as_int))
    records, log = _read(_amazon_cfg(small_dpl, tmp_path))
    expected, expected_log = _read(_amazon_cfg(small_dpl))
    shown = lambda rs: [json.dumps(_as_dpl(r), sort_keys=True) for r in rs]  # 5 and 5.0 differ here
    assert shown(records) == shown(expected) and log.dropped == expected_log.dropped
    assert {type(review["rating"]) for review in _reviews_of(records)} == {float}


def test_amazon2023_a_user_with_as_many_reviews_as_targets_is_left_to_the_profile_filter(small_dpl):
    """With `dpl_num_targets` 7, U1, U2 and U4 (7 reviews after de-duplication; U3 8) have 7 targets and an
    empty profile: not too few for the targets (`< dpl_num_targets`, as the reference's split `rs[:-7],
    rs[-7:]` takes them), so the profile filter decides. `dpl_min_profile_reviews` 2 drops all four users
    (U3's one profile review is on an item no other profile has), each counted with its 7 targets under
    `review_user_profile_too_small`; 0 keeps them, 7 records each."""
    rows, metas = _rows(AMAZON / "Books.jsonl"), _rows(AMAZON / "meta_Books.jsonl")
    for min_profile, users in ((2, 0), (0, 4)):
        thresholds = {**small_dpl, "dpl_num_targets": 7, "dpl_min_profile_reviews": min_profile}
        records, log = _read(_amazon_cfg(thresholds))
        ours, reference = _with_reference(records, rows, metas, targets=7, min_profile_reviews=min_profile)
        assert ours == reference
        assert len({r.user_id for r in records}) == users and len(records) == 7 * users
        assert "review_user_too_few_targets" not in log.dropped
        assert log.dropped["review_user_profile_too_small"] == 7 * (4 - users)
    # With 8 targets, the three users of 7 reviews have too few (their 21 reviews counted); U3 is kept.
    thresholds = {**small_dpl, "dpl_num_targets": 8, "dpl_min_profile_reviews": 0}
    records, log = _read(_amazon_cfg(thresholds))
    ours, reference = _with_reference(records, rows, metas, targets=8, min_profile_reviews=0)
    assert ours == reference and len(records) == 8 and {r["user_id"] for r in ours} == {"U3"}
    assert log.dropped["review_user_too_few_targets"] == 21


def test_amazon2023_keeps_the_first_metadata_row_of_a_repeated_item_and_counts_the_rest(tmp_path, small_dpl):
    """NEXTQUILL.md is silent on a `parent_asin` given twice in the metadata; as the `dpl` reader (and
    `reference_dpl`, stating it), the first row is the item's and the later one is counted as
    `item_duplicate`: The Glass Harbor keeps its title, not the repeat's."""
    metas = _rows(AMAZON / "meta_Books.jsonl")
    first = metas[3]
    assert (first["parent_asin"], first["title"]) == ("B000000004", "The Glass Harbor")
    metas.append({**first, "title": "A Later Title"})
    (tmp_path / "meta_Books.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metas))
    records, log = _read(_amazon_cfg(small_dpl, meta=tmp_path))
    ours, reference = _with_reference(records, _rows(AMAZON / "Books.jsonl"), metas)
    assert ours == reference
    titles = {review["item_title"] for review in _reviews_of(records)}
    assert "The Glass Harbor" in titles and "A Later Title" not in titles
    expected, expected_log = _read(_amazon_cfg(small_dpl))
    assert records == expected and log.dropped == {**expected_log.dropped, "item_duplicate": 1}


def test_amazon2023_refuses_an_empty_user_id(tmp_path, small_dpl):
    """A review with an empty or whitespace-only `user_id` names no user: it was grouped with the other such
    reviews as one user and its records' ids read `Books//3`. It is an invalid record, as in every reader."""
    rows = _rows(AMAZON / "Books.jsonl")
    rows[0]["user_id"], rows[1]["user_id"] = "", " "
    (tmp_path / "Books.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(AMAZON / "meta_Books.jsonl", tmp_path)
    cfg = _amazon_cfg(small_dpl, tmp_path, tmp_path)
    with pytest.raises(DataError) as e:
        _read(cfg)
    assert str(e.value).startswith("2 invalid input record(s) (2 empty_field); nothing was prepared:\n  ")
    for line in (1, 2):
        assert (
            f"{tmp_path}/Books.jsonl:{line}:user_id: `user_id` is empty; reviews are grouped by user, and a "
            "record's id names its user. Fix: give the user's id, or remove the row\n"
        ) in str(e.value)
    records, log = _read(dataclasses.replace(cfg, on_error="skip"))
    assert dict(log.errors) == {"empty_field": 2}
    assert all(r.user_id.strip() for r in records)


def test_amazon2023_reviews_of_an_invalid_metadata_row_are_counted_not_reported_missing(tmp_path, small_dpl):
    """The metadata row of The Glass Harbor has a string `description`: that row is the error. Its four
    reviews were each reported as `unknown_item`, "not in the metadata file", though the item is there; they
    are counted under `review_item_invalid` instead."""
    meta = _rows(AMAZON / "meta_Books.jsonl")
    assert meta[3]["title"] == "The Glass Harbor"
    meta[3]["description"] = "a string"
    (tmp_path / "meta_Books.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    cfg = _amazon_cfg(small_dpl, meta=tmp_path)
    with pytest.raises(DataError) as e:
        _read(cfg)
    assert str(e.value).splitlines()[:2] == [
        "1 invalid input record(s) (1 wrong_type); nothing was prepared:",
        f"  {tmp_path}/meta_Books.jsonl:4:description: `description` must be a list, got str 'a string'. "
        "Fix: write it as a list, or null",
    ]
    _, log = _read(dataclasses.replace(cfg, on_error="skip"))
    assert dict(log.errors) == {"wrong_type": 1} and log.dropped["review_item_invalid"] == 4


def test_amazon2023_runs_the_protocol_per_category(tmp_path, small_dpl):
    for category in ("Books", "Movies_and_TV"):
        shutil.copy(AMAZON / "Books.jsonl", tmp_path / f"{category}.jsonl")
        shutil.copy(AMAZON / "meta_Books.jsonl", tmp_path / f"meta_{category}.jsonl")
    cfg = DataConfig(
        format="amazon2023",
        sources=[str(tmp_path / "[BM]*.jsonl")],
        meta=[str(tmp_path / "meta_*")],
        **small_dpl,
    )
    records, log = _read(cfg)
    books, _ = _read(_amazon_cfg(small_dpl))
    assert [r.category for r in records] == ["Books"] * 12 + ["Movies_and_TV"] * 12
    assert [r.id for r in records[12:]] == [r.id.replace("Books", "Movies_and_TV") for r in books]
    assert log.dropped["review_duplicate_item"] == 2 and sum(log.read.values()) == 2 * (40 + 14)


def test_amazon2023_reads_one_line_json_arrays_as_the_same_records(tmp_path, small_dpl):
    """`json.dump` writes an array on one line, where every review starts on line 1: the second pass, which
    fetches the kept reviews' titles and texts, found them by line and gave every example the same text.
    Each record now gets its own review, and its `source` names the line and the row."""
    for name in ("Books", "meta_Books"):
        (tmp_path / f"{name}.json").write_text(json.dumps(_rows(AMAZON / f"{name}.jsonl")))
    cfg = _amazon_cfg(small_dpl, tmp_path, tmp_path, "json")
    records, log = _read(cfg)
    expected, expected_log = _read(_amazon_cfg(small_dpl))
    assert [dataclasses.replace(r, source="") for r in records] == [
        dataclasses.replace(r, source="") for r in expected
    ]
    assert len({r.target for r in records}) == len(records) == 12
    # The fixture has no blank lines: row N of the array is line N of the .jsonl file.
    assert [r.source for r in records] == [
        f"{tmp_path / 'Books.json'}:1 (row {r.source.rpartition(':')[2]})" for r in expected
    ]
    assert log.dropped == expected_log.dropped


def test_a_row_of_a_one_line_json_array_is_named_by_its_line_and_row(tmp_path):
    good = {"user_id": "u", "context": "c", "history": ["h"], "target": "t", "split": "train"}
    path = tmp_path / "records.json"
    path.write_text(json.dumps([good, {**good, "target": ""}, 7]) + "\n")
    with pytest.raises(DataError) as e:
        _read(DataConfig(format="generic", template="plain", sources=[str(path)]))
    assert f"{path}:1 (row 2):target: `target` is empty" in str(e.value)
    assert f"{path}:1 (row 3): array elements must be objects, got int" in str(e.value)


def test_text_after_the_value_of_a_json_file_is_refused_naming_its_line(tmp_path):
    """The reader decoded the first JSON value and ignored the rest: `[rec1]` then `[rec2, rec3]` read one
    record. Anything but whitespace after the value is now an error naming the file and line."""
    record = lambda target: {"user_id": "u", "context": "c", "history": ["h"], "target": target}
    path = tmp_path / "records.json"
    path.write_text(json.dumps([record("1")]) + "\n" + json.dumps([record("2"), record("3")]) + "\n")
    with pytest.raises(ValueError) as e:
        _read(DataConfig(format="generic", template="plain", sources=[str(path)]))
    assert str(e.value) == (
        f"{path}:2: more text after the JSON value that ends on line 1; a .json file holds one value (an "
        "array of objects, or an object holding one). Fix: put all the records in one array, or write one "
        "object per line in a .jsonl file"
    )
    path.write_text(json.dumps([record("1"), record("2")]) + "\n \n\t\n")  # trailing whitespace is fine
    records, _ = _read(DataConfig(format="generic", template="plain", sources=[str(path)]))
    assert [r.target for r in records] == ["1", "2"]


def test_a_damaged_gzip_or_parquet_file_is_an_error_naming_the_file_and_the_fix(tmp_path):
    """A `.jsonl.gz` that is not gzip or is cut short, and a Parquet file cut short, raised the library's
    error (BadGzipFile, EOFError, ArrowInvalid) with a traceback that named no file."""
    record = {"user_id": "u", "context": "c", "history": ["h"], "target": "t"}
    lines = "".join(json.dumps({**record, "target": str(i)}) + "\n" for i in range(3)).encode()
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_bytes(lines)
    # Without the 8-byte trailer the three lines still decompress; the end of the stream is missing.
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(lines)[:-8])
    table = tmp_path / "cut.parquet"
    pq.write_table(pa.Table.from_pylist([record] * 3), table)
    table.write_bytes(table.read_bytes()[:-10])
    config = lambda path: DataConfig(format="generic", template="plain", sources=[str(path)])
    with pytest.raises(ValueError) as e:
        _read(config(not_gzip))
    assert str(e.value) == (
        f"{not_gzip}: cannot be decompressed (Not a gzipped file (b'{{\"')); the file is cut short, damaged "
        f"or not gzip. Fix: download or compress it again (`gzip -t {not_gzip}` checks it), or name a plain "
        "JSON-lines file .jsonl"
    )
    with pytest.raises(ValueError) as e:
        _read(config(cut))
    assert str(e.value).startswith(
        f"{cut}: cannot be decompressed (Compressed file ended before the end-of-stream marker was reached) "
        "after line 3; the file is cut short, damaged or not gzip."
    )
    with pytest.raises(ValueError) as e:
        _read(config(table))
    message = str(e.value)
    assert message.startswith(f"{table}: cannot be read as Parquet (Parquet magic bytes not found in footer")
    assert message.endswith("cut short, damaged or not Parquet. Fix: download or write it again")


def test_amazon2023_refuses_two_review_or_metadata_files_of_one_name(tmp_path, small_dpl):
    """Files are paired by name: of x/meta_Books.jsonl and y/meta_Books.jsonl the second replaced the first,
    so x's reviews were read against y's items (every one an `unknown_item`). Both are named instead."""
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        for name in ("Books.jsonl", "meta_Books.jsonl"):
            shutil.copy(AMAZON / name, tmp_path / d / name)
    x, y = tmp_path / "x", tmp_path / "y"
    cfg = lambda sources, meta: DataConfig(
        format="amazon2023", sources=sources, meta=meta, on_error="skip", **small_dpl
    )
    with pytest.raises(ValueError) as e:
        _read(cfg([str(x / "Books.jsonl")], [str(x / "meta_Books.jsonl"), str(y / "meta_Books.jsonl")]))
    assert str(e.value) == (
        f"data.meta: two metadata files named meta_Books: {x}/meta_Books.jsonl and {y}/meta_Books.jsonl. "
        "Review and metadata files are paired by name alone (`<Category>` with `meta_<Category>`), so a "
        "category has one of each. Fix: keep one of them in data.meta"
    )
    # The second review file was reported as having no metadata file, though a meta_Books was given.
    with pytest.raises(ValueError) as e:
        _read(cfg([str(tmp_path / "*" / "Books.jsonl")], [str(x / "meta_Books.jsonl")]))
    assert str(e.value).startswith(f"data.sources: two review files named Books: {x}/Books.jsonl and {y}/")


def test_dpl_rows_give_the_same_records_as_the_raw_amazon_files(tmp_path, small_dpl):
    amazon, _ = _read(_amazon_cfg(small_dpl))
    dpl_dir = FIXTURES / "dpl"
    cfg = DataConfig(
        format="dpl", sources=[str(dpl_dir / "Books" / "*.jsonl")], meta=[str(dpl_dir / "meta" / "*.jsonl")]
    )
    records, log = _read(cfg)
    assert sorted(map(_as_dpl, records), key=_key) == sorted(map(_as_dpl, amazon), key=_key)
    assert {r.category for r in records} == {"Books"} and not log.dropped
    # The same rows as Parquet (the published DPL data is Parquet) read identically.
    pq_dir = tmp_path / "Books"
    pq_dir.mkdir()
    for split in ("train", "val", "test"):
        pq.write_table(
            pa.Table.from_pylist(_rows(dpl_dir / "Books" / f"{split}.jsonl")),
            pq_dir / f"{split}-00000.parquet",
        )
    pq.write_table(pa.Table.from_pylist(_rows(dpl_dir / "meta" / "Books.jsonl")), tmp_path / "meta.parquet")
    cfg = DataConfig(format="dpl", sources=[str(pq_dir / "*.parquet")], meta=[str(tmp_path / "meta.parquet")])
    from_parquet, _ = _read(cfg)
    assert sorted(map(_as_dpl, from_parquet), key=_key) == sorted(map(_as_dpl, records), key=_key)
    assert from_parquet[0].source.endswith("test-00000.parquet:1")


def test_dpl_rows_with_integer_ratings_and_a_repeated_item_give_the_same_records(tmp_path):
    """Ratings written as integers (5, as other tools write the published data) print as Python floats (5.0),
    as the raw Amazon path and the public code's data give them: the prompts are the same text. An item
    listed twice in the metadata keeps its first row, and the repeat is counted."""
    dpl_dir = FIXTURES / "dpl"
    expected, _ = _read(
        DataConfig(
            format="dpl",
            sources=[str(dpl_dir / "Books" / "*.jsonl")],
            meta=[str(dpl_dir / "meta" / "*.jsonl")],
        )
    )
    as_int = lambda review: {**review, "rating": int(review["rating"])}
    (tmp_path / "Books").mkdir()
    for split in ("train", "val", "test"):
        rows = [
            {**row, "data": as_int(row["data"]), "profile": [as_int(r) for r in row["profile"]]}
            for row in _rows(dpl_dir / "Books" / f"{split}.jsonl")
        ]
        (tmp_path / "Books" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metas = _rows(dpl_dir / "meta" / "Books.jsonl")
    repeat = {**metas[0], "title": "Another Title", "description": "Another description entirely."}
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(m) + "\n" for m in [*metas, repeat]))
    cfg = DataConfig(
        format="dpl", sources=[str(tmp_path / "Books" / "*.jsonl")], meta=[str(tmp_path / "meta.jsonl")]
    )
    records, log = _read(cfg)
    shown = lambda rs: sorted(json.dumps(_as_dpl(r), sort_keys=True) for r in rs)  # 5 and 5.0 differ here
    assert shown(records) == shown(expected) and dict(log.dropped) == {"item_duplicate": 1}


def test_lamp_topic_writing_and_abstract():
    tw = FIXTURES / "lamp" / "topic_writing"
    cfg = _topic_writing_cfg(tw)
    records, log = _read(cfg)
    assert [r.id for r in records] == ["tw-101", "tw-102"] and dict(log.dropped) == {"empty_history": 1}
    r = records[0]
    assert r.split == "val" and r.category == "topic_writing" and r.user_id == "tw-101"
    assert r.target.startswith("Left it on the seat") and r.context["input"].endswith("watch on the train")
    assert [e.fields["summary"] for e in r.history] == [
        "First time baking sourdough",
        "My cat learned to open doors",
        "Ran my first 10k",
    ]
    assert r.source == f"{tw / 'dev_questions.json'}:2"  # the line its array element starts on
    assert records[1].source == f"{tw / 'dev_questions.json'}:23"  # its "{" is on line 23

    ab = FIXTURES / "lamp" / "abstract"
    cfg = DataConfig(
        format="lamp",
        template="lamp_abstract",
        sources=[str(ab / "train_questions.jsonl")],
        meta=[str(ab / "train_outputs.json")],
    )
    records, log = _read(cfg)
    assert [r.id for r in records] == ["501", "502"] and dict(log.dropped) == {"duplicate": 1}
    assert records[1].history[0].fields["abstract"].startswith("We revisit message passing")
    assert records[0].target.startswith("We present a sparse attention pattern")


def test_generic_records(tmp_path):
    path = FIXTURES / "generic" / "records.jsonl"
    cfg = DataConfig(format="generic", template="plain", sources=[str(path)], default_split="train")
    records, log = _read(cfg)
    assert dict(log.dropped) == {"duplicate": 1, "empty_history": 1}
    assert [(r.user_id, r.split) for r in records] == [
        ("alice", "train"),
        ("alice", "val"),
        ("bob", "train"),
        ("bob", "test"),
    ]
    assert records[0].context == {"context": "Write a short note about the weekend."}
    assert [e.fields["text"] for e in records[0].history] == [
        "Saturday was rainy, so I read all day.",
        "Sunday I baked bread and it was fine.",
    ]
    # Timestamped entries are sorted oldest first; other fields are kept; meta is carried untouched.
    assert [e.fields["place"] for e in records[1].history] == ["station", "home", "coast"]
    assert records[1].context == {"topic": "holiday plans", "length": 40, "mood": "cheerful"}
    assert records[1].meta == {
        "target_spans": [[0, 12, "context"], [14, 19, "preference"]],
        "note": "kept as is",
    }
    # .jsonl.gz reads the same.
    gz = tmp_path / "records.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    again, _ = _read(DataConfig(format="generic", template="plain", sources=[str(gz)]))
    assert [(r.user_id, r.target, r.history, r.meta) for r in again] == [
        (r.user_id, r.target, r.history, r.meta) for r in records
    ]


def test_generic_entries_with_equal_timestamps_keep_their_file_order(tmp_path):
    """Sorting by timestamp is stable (the public code's `sorted`): entries a and b written in that order
    at the same time stay a before b, oldest first, and newest first for the prompt: [c, a, b] and
    [a, b, c] (Python's sorted with and without reverse=True, by hand)."""
    from nextquill_jax.data.examples import recent_first

    history = [{"text": t, "timestamp": ts} for t, ts in (("a", 1), ("b", 1), ("c", 0))]
    path = tmp_path / "r.jsonl"
    record = {"user_id": "u", "context": "Hi.", "history": history, "target": "Yo."}
    path.write_text(json.dumps(record) + "\n")
    (record,), _ = _read(DataConfig(format="generic", template="plain", sources=[str(path)]))
    assert [e.fields["text"] for e in record.history] == ["c", "a", "b"]
    assert [e.fields["text"] for e in recent_first(record.history)] == ["a", "b", "c"]


BAD_AMAZON = FIXTURES / "amazon2023_bad"
BAD_GENERIC = FIXTURES / "generic_bad" / "records.jsonl"


def _bad_amazon_cfg(thresholds, on_error):
    return DataConfig(
        format="amazon2023",
        sources=[str(BAD_AMAZON / "Books.jsonl")],
        meta=[str(BAD_AMAZON / "meta_Books.jsonl")],
        on_error=on_error,
        **thresholds,
    )


def test_bad_input_fails_listing_every_file_line_and_field(small_dpl):
    with pytest.raises(DataError) as e:
        _read(_bad_amazon_cfg(small_dpl, "fail"))
    msg = str(e.value)
    f = BAD_AMAZON / "Books.jsonl"
    assert f"{f}:5: not valid JSON" in msg
    assert f"{f}:12:user_id: required field `user_id` is missing" in msg
    assert f"{f}:20:text: byte 0xff at column" in msg
    assert f"{f}:44:parent_asin: item 'B0UNKNOWN0' is not in the metadata file" in msg
    assert msg.startswith("4 invalid input record(s)") and "data.on_error: skip" in msg

    with pytest.raises(DataError) as e:
        _read(DataConfig(format="generic", template="plain", sources=[str(BAD_GENERIC)]))
    msg = str(e.value)
    # The truncated line 2 has 75 characters: the decoder stops just past them, on that line.
    assert f"{BAD_GENERIC}:2: not valid JSON (Expecting ',' delimiter at column 76)" in msg
    assert f"{BAD_GENERIC}:4:target: required field `target` is missing" in msg
    assert f"{BAD_GENERIC}:6:history[0]: byte 0xe9 at column" in msg
    assert f"{BAD_GENERIC}:7:history: `history` must be a list, got str" in msg
    # A misspelt key would have put line 9 in the default split (train) instead of test.
    assert (
        f"{BAD_GENERIC}:9:spilt: unknown field `spilt` (did you mean `split`?); a generic record has "
        "user_id, context, history, target, category, split, id, meta. Fix: rename it, or move extra data "
        "into `meta`"
    ) in msg
    # Empty texts would train on EOS alone, or on entries that tell nothing about the user.
    assert f"{BAD_GENERIC}:10:target: `target` is empty; the example would learn only the end-of-text" in msg
    assert f"{BAD_GENERIC}:11:user_id: `user_id` is empty; records are grouped" in msg
    assert f"{BAD_GENERIC}:12:history[1]: `history[1]` is empty; an entry without text tells nothing" in msg
    assert f"{BAD_GENERIC}:13:history[0].text: `history[0].text` is empty; " in msg
    assert msg.startswith("9 invalid input record(s) (4 empty_field, ")


def test_bad_input_skipped_and_counted_exactly(small_dpl):
    records, log = _read(_bad_amazon_cfg(small_dpl, "skip"))
    assert dict(log.errors) == {"malformed_json": 1, "missing_field": 1, "invalid_utf8": 1, "unknown_item": 1}
    good, good_log = _read(_amazon_cfg(small_dpl))
    assert log.dropped == good_log.dropped and len(records) == len(good)
    records, log = _read(
        DataConfig(format="generic", template="plain", sources=[str(BAD_GENERIC)], on_error="skip")
    )
    assert dict(log.errors) == {
        "malformed_json": 1,
        "missing_field": 1,
        "invalid_utf8": 1,
        "wrong_type": 1,
        "unknown_field": 1,
        "empty_field": 4,
    }
    assert [r.source for r in records] == [f"{BAD_GENERIC}:{line}" for line in (1, 3, 5, 8)]


def test_a_lone_surrogate_escape_is_invalid_text_named_by_its_field_in_jsonl_and_json_files(tmp_path):
    """JSON may spell half of a UTF-16 pair (`"\\ud83d"`, a cut-off emoji): it decodes to a string with no
    UTF-8 form, on which the tokenizer (or writing the prepared split) failed with a message naming no
    record. It is an `invalid_utf8` record naming the file, line and field: listed under `fail`, counted
    and skipped under `skip`; a whole pair (an emoji spelt as two escapes) is text and is kept."""
    good = {"user_id": "u", "context": "c", "history": ["h"], "target": "fine \ud83d\ude00", "split": "train"}
    lone_target = {**good, "target": "cut \ud83d"}
    lone_meta = {**good, "meta": {"note": ["x", "\udc00"]}}
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in (good, lone_target, lone_meta)))
    array = tmp_path / "records.json"
    array.write_text("[\n" + ",\n".join(json.dumps(r) for r in (good, lone_target, lone_meta)) + "\n]\n")
    assert "\\ud83d" in jsonl.read_text()  # json.dumps escapes it: the file itself is valid UTF-8
    for path in (jsonl, array):
        line = 1 if path == jsonl else 2
        with pytest.raises(DataError) as e:
            _read(DataConfig(format="generic", template="plain", sources=[str(path)]))
        msg = str(e.value)
        assert f"{path}:{line + 1}:target: holds a lone UTF-16 surrogate" in msg
        assert f"{path}:{line + 2}:meta.note[1]: holds a lone UTF-16 surrogate" in msg
        records, log = _read(
            DataConfig(format="generic", template="plain", sources=[str(path)], on_error="skip")
        )
        assert dict(log.errors) == {"invalid_utf8": 2}
        assert [r.source for r in records] == [f"{path}:{line}"] and records[0].target == "fine \U0001f600"


def test_a_record_dropped_for_its_empty_history_does_not_make_a_later_copy_with_history_a_repeat(tmp_path):
    """Line 1 has no history (dropped: `empty_history`); line 2 is the same record with one: it is kept,
    not dropped as a `duplicate` of a record that was not kept. Line 3 repeats line 2: that one is."""
    bare = {"user_id": "u1", "context": "c", "history": [], "target": "t", "split": "train"}
    path = tmp_path / "records.jsonl"
    lines = (bare, {**bare, "history": ["h"]}, {**bare, "history": ["h2"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    records, log = _read(DataConfig(format="generic", template="plain", sources=[str(path)]))
    assert [r.source for r in records] == [f"{path}:2"]
    assert dict(log.dropped) == {"empty_history": 1, "duplicate": 1}


def test_fail_mode_lists_the_first_errors_and_counts_the_rest(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join('{"user_id": "u"}\n' for _ in range(30)))
    with pytest.raises(DataError) as e:
        _read(DataConfig(format="generic", template="plain", sources=[str(path)], max_errors_shown=5))
    msg = str(e.value)
    assert msg.count(": required field") == 5 and "... and 25 more" in msg and f"{path}:30" not in msg


def test_a_source_whose_name_holds_glob_characters_is_read_as_that_file(tmp_path):
    """`data[1].jsonl` exists: it is read (it was taken for a pattern matching `data1.jsonl` and refused as
    missing); `data[12].jsonl`, which does not exist, is still a pattern (matching data1 and data2)."""
    record = {"user_id": "u", "context": "c", "history": ["h"], "target": "t", "split": "train"}
    for name, target in (("data[1].jsonl", "bracketed"), ("data1.jsonl", "one"), ("data2.jsonl", "two")):
        (tmp_path / name).write_text(json.dumps({**record, "target": target}) + "\n")
    config = lambda pattern: DataConfig(format="generic", template="plain", sources=[str(tmp_path / pattern)])
    records, _ = _read(config("data[1].jsonl"))
    assert [r.target for r in records] == ["bracketed"]
    records, _ = _read(config("data[12].jsonl"))
    assert [r.target for r in records] == ["one", "two"]


def test_configuration_errors_name_the_setting(tmp_path, small_dpl):
    with pytest.raises(ValueError, match=r"data.sources: no file matches"):
        _read(DataConfig(format="generic", template="plain", sources=[str(tmp_path / "nothing*.jsonl")]))
    # A directory is not a file: say so and give a glob for its files (by their suffix).
    (tmp_path / "my").mkdir()
    with pytest.raises(ValueError) as e:
        _read(DataConfig(format="generic", template="plain", sources=[str(tmp_path / "my")]))
    assert f"{str(tmp_path / 'my')!r} is a directory, not a file" in str(e.value)
    assert repr(str(tmp_path / "my" / "*.jsonl")) in str(e.value)
    (tmp_path / "my" / "a.jsonl.gz").write_bytes(b"")
    (tmp_path / "my" / "notes.txt").write_text("")
    with pytest.raises(
        ValueError, match=r"matches only directories \(.*my\), no files.*e\.g\. '.*my/\*\.jsonl\.gz'"
    ):
        _read(DataConfig(format="generic", template="plain", sources=[str(tmp_path / "m*")]))
    lonely = tmp_path / "Movies.jsonl"
    shutil.copy(AMAZON / "Books.jsonl", lonely)
    with pytest.raises(ValueError, match=r"no metadata file for reviews .*meta_Movies"):
        _read(DataConfig(format="amazon2023", sources=[str(lonely)], meta=[str(AMAZON / "meta_Books.jsonl")]))
    # The other way round: metadata of a category with no review file would be read for nothing.
    toys = tmp_path / "meta_Toys.jsonl"
    shutil.copy(AMAZON / "meta_Books.jsonl", toys)
    metas = [str(AMAZON / "meta_Books.jsonl"), str(toys)]
    broken_books = tmp_path / "broken" / "Books.jsonl"  # refused before any file is read: this is not
    broken_books.parent.mkdir()
    broken_books.write_text("{not json\n")
    with pytest.raises(ValueError) as e:
        _read(DataConfig(format="amazon2023", sources=[str(broken_books)], meta=metas, **small_dpl))
    assert str(e.value) == (
        f"data.meta: metadata files without a review file in data.sources: {toys}. Fix: add each one's "
        "<Category>.jsonl (or .jsonl.gz, .parquet) review file to data.sources, or remove it from data.meta"
    )
    with pytest.raises(ValueError, match=r"'lamp_topic_writing' needs context fields \['input'\]"):
        _read(_amazon_cfg(small_dpl, template="lamp_topic_writing"))
    assert split_from_name(FIXTURES / "lamp" / "topic_writing" / "dev_questions.json") == "val"
    with pytest.raises(ValueError, match="cannot tell its split"):
        split_from_name(tmp_path / "rows.jsonl")
    with pytest.raises(ValueError, match=r"data.max_history must be an integer >= 0"):
        DataConfig(max_history=-1)


def test_synthetic_format_reads_the_generated_benchmark(tmp_path):
    from nextquill_jax.data.sources.synth import generate_synthetic

    generate_synthetic(tmp_path, users=3, seed=5)
    template = load_template("review")
    from_file = read_records(
        DataConfig(format="generic", sources=[str(tmp_path / "synthetic.jsonl")]), template, IssueLog()
    )
    log = IssueLog()
    in_process = read_records(
        DataConfig(format="synthetic", synthetic_users=3, synthetic_seed=5), template, log
    )
    assert len(in_process) == len(from_file) > 0
    # Equal but for `source`, which names the (temporary) file and line each record came from.
    strip = lambda records: [dataclasses.replace(r, source="") for r in records]
    assert strip(in_process) == strip(from_file)
    # The temporary file is gone after reading, so `source` names the generator, seed, line and user instead.
    lines = (tmp_path / "synthetic.jsonl").read_text(encoding="utf-8").splitlines()
    for generated, read in zip(in_process, from_file, strict=True):
        line = int(read.source.rpartition(":")[2])
        row = json.loads(lines[line - 1])
        assert (row["user_id"], row["target"]) == (generated.user_id, generated.target)
        assert generated.source == f"synthetic(users=3, seed=5):{line} user {generated.user_id}"
    # The rows read are counted under the generator too, not under the deleted file (summary.json's `read`).
    assert dict(log.read) == {"synthetic(users=3, seed=5)": len(lines)}
    other_seed = read_records(
        DataConfig(format="synthetic", synthetic_users=3, synthetic_seed=6), template, IssueLog()
    )
    assert strip(other_seed) != strip(in_process)
    with pytest.raises(ValueError, match="synthetic format generates its records"):
        DataConfig(format="synthetic", sources=["x.jsonl"])


@pytest.mark.parametrize("array", [False, True], ids=["jsonl", "json"])
def test_a_json_message_ending_in_at_is_not_doubled(tmp_path, array):
    # json's "Unterminated string starting at" must not read "... starting at at column 13".
    path = tmp_path / ("records.json" if array else "records.jsonl")
    path.write_text('[{"user_id": "x' if array else '{"user_id": "x\n')
    with pytest.raises((DataError, ValueError)) as e:
        _read(DataConfig(format="generic", template="plain", sources=[str(path)]))
    column = 14 if array else 13
    assert f"not valid JSON (Unterminated string starting at column {column})" in str(e.value)


@pytest.mark.parametrize("kind", [".jsonl", ".jsonl.gz", ".json"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, kind):
    # Windows editors start UTF-8 files with a BOM; line 1 used to be invalid ("Unexpected UTF-8 BOM").
    path = FIXTURES / "generic" / "records.jsonl"
    expected, _ = _read(DataConfig(format="generic", template="plain", sources=[str(path)]))
    text = path.read_text(encoding="utf-8")
    if kind == ".json":
        text = "[" + ",\n".join(text.splitlines()) + "]"
    data = codecs.BOM_UTF8 + text.encode("utf-8")
    with_bom = tmp_path / f"records{kind}"
    with_bom.write_bytes(gzip.compress(data) if kind == ".jsonl.gz" else data)
    records, log = _read(DataConfig(format="generic", template="plain", sources=[str(with_bom)]))
    assert dict(log.errors) == {}
    assert [dataclasses.replace(r, source="") for r in records] == [
        dataclasses.replace(r, source="") for r in expected
    ]
    assert records[0].source == f"{with_bom}:1"


def test_every_field_a_template_needs_and_a_record_lacks_is_named_in_one_message(tmp_path):
    path = tmp_path / "records.jsonl"
    record = {
        "user_id": "u",
        "context": {"item_title": "Dune", "title": "Slow start"},
        # Entries are named as written (file order), although timestamps sort them oldest first.
        "history": [
            {"text": "a", "item_title": "X", "rating": 4, "timestamp": 2},
            {
                "text": "b",
                "item_title": "Y",
                "item_description": "d",
                "rating": 5,
                "title": "t",
                "timestamp": 1,
            },
        ],
        "target": "t",
    }
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        _read(DataConfig(format="generic", template="review", sources=[str(path)]))
    assert (
        f"{path}:1:context.item_description: the prompt template 'review' needs `context.item_description`, "
        "`context.rating`, `history[0].item_description`, `history[0].title`, which the record lacks; add "
        "them or choose another data.template (`plain` takes any fields)"
    ) in str(e.value)
    assert str(e.value).startswith("1 invalid input record(s) (1 missing_field)")
    # A long history lacking a field in every entry: the first ten are named, the rest counted.
    record = {"user_id": "u", "context": "c", "history": [{"text": str(i)} for i in range(12)], "target": "t"}
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        _read(DataConfig(format="generic", template="review", sources=[str(path)]))
    assert "`history[1].item_title` and 42 more, which the record lacks" in str(e.value)

    questions = tmp_path / "train_questions.jsonl"
    questions.write_text(
        json.dumps({"id": "q1", "input": "i", "output": "o", "profile": [{}, {"summary": "s"}]}) + "\n"
    )
    with pytest.raises(DataError) as e:
        _read(DataConfig(format="lamp", template="lamp_topic_writing", sources=[str(questions)]))
    assert (
        f"{questions}:1:profile[0].content: the prompt template 'lamp_topic_writing' needs "
        "`profile[0].content`, `profile[0].summary`, `profile[1].content`, which the record lacks"
    ) in str(e.value)


def test_unknown_generic_keys_are_all_named_with_the_nearest_unused_field(tmp_path):
    path = tmp_path / "records.jsonl"
    base = {"user_id": "u", "context": "c", "history": ["h"], "target": "t"}
    path.write_text(json.dumps({**base, "split": "test", "spilt": "val", "usr": "x", "Category": "c"}) + "\n")
    with pytest.raises(DataError) as e:
        _read(DataConfig(format="generic", template="plain", sources=[str(path)]))
    # `split` is there already, so `spilt` is not taken for it; `Category` is near the unused `category`.
    assert (
        f"{path}:1:spilt: unknown fields `spilt`, `usr`, `Category` (did you mean `category`?); a generic "
        "record has user_id, context, history, target, category, split, id, meta. Fix: rename them"
    ) in str(e.value)


def test_every_missing_required_generic_field_is_named_at_once(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"context": "c", "history": ["h"]}) + "\n")
    with pytest.raises(DataError) as e:
        _read(DataConfig(format="generic", template="plain", sources=[str(path)]))
    assert (
        f"{path}:1:user_id: required fields `user_id`, `target` are missing; a generic record needs user_id, "
        "context, history, target"
    ) in str(e.value)


def test_an_empty_dpl_review_text_or_lamp_output_is_an_invalid_record(tmp_path):
    rows = (FIXTURES / "dpl" / "Books" / "train.jsonl").read_text().splitlines()
    first = json.loads(rows[0])
    first["data"]["text"] = "  "
    first["profile"][1]["text"] = ""
    dpl = tmp_path / "Books" / "train.jsonl"
    dpl.parent.mkdir()
    dpl.write_text("\n".join([json.dumps(first), *rows[1:]]) + "\n")
    meta = str(FIXTURES / "dpl" / "meta" / "Books.jsonl")
    with pytest.raises(DataError) as e:
        _read(DataConfig(format="dpl", sources=[str(dpl)], meta=[meta]))
    assert str(e.value).startswith("1 invalid input record(s) (1 empty_field)"), str(e.value)
    assert f"{dpl}:1:data.text: `data.text` is empty; the DPL protocol keeps only reviews of at least" in str(
        e.value
    )

    questions = tmp_path / "train_questions.jsonl"
    questions.write_text(
        json.dumps({"id": "q1", "input": "i", "output": " ", "profile": [{"summary": "s", "content": "c"}]})
    )
    with pytest.raises(DataError) as e:
        _read(DataConfig(format="lamp", template="lamp_topic_writing", sources=[str(questions)]))
    assert f"{questions}:1:output: `output` is empty; the example would learn only the end-of-text" in str(
        e.value
    )


def test_an_empty_dpl_or_lamp_user_id_is_an_invalid_record(tmp_path):
    """As the generic reader's: an empty or whitespace-only `user_id` names no user (DPL made the id
    `Books//test/5` of one). A LaMP question without `user_id` still takes its id as the user."""
    rows = (FIXTURES / "dpl" / "Books" / "train.jsonl").read_text().splitlines()
    first, second = json.loads(rows[0]), json.loads(rows[1])
    first["user_id"], second["user_id"] = "", "  "
    dpl = tmp_path / "Books" / "train.jsonl"
    dpl.parent.mkdir()
    dpl.write_text("\n".join([json.dumps(first), json.dumps(second), *rows[2:]]) + "\n")
    cfg = DataConfig(format="dpl", sources=[str(dpl)], meta=[str(FIXTURES / "dpl" / "meta" / "Books.jsonl")])
    with pytest.raises(DataError) as e:
        _read(cfg)
    assert str(e.value).startswith("2 invalid input record(s) (2 empty_field); nothing was prepared:\n  ")
    for line in (1, 2):
        assert (
            f"{dpl}:{line}:user_id: `user_id` is empty; records are grouped and de-duplicated by user, and a "
            "record's id names its user. Fix: give the user's id, or remove the row\n"
        ) in str(e.value)
    records, log = _read(dataclasses.replace(cfg, on_error="skip"))
    assert [r.source for r in records] == [f"{dpl}:3", f"{dpl}:4"]
    assert dict(log.errors) == {"empty_field": 2}

    profile = [{"summary": "s", "content": "c"}]
    questions = tmp_path / "train_questions.jsonl"
    questions.write_text(
        json.dumps({"id": "q1", "input": "i", "output": "o", "user_id": " ", "profile": profile})
        + "\n"
        + json.dumps({"id": "q2", "input": "i", "output": "o", "profile": profile})
        + "\n"
    )
    cfg = DataConfig(format="lamp", template="lamp_topic_writing", sources=[str(questions)])
    with pytest.raises(DataError) as e:
        _read(cfg)
    assert str(e.value).startswith("1 invalid input record(s) (1 empty_field); nothing was prepared:\n  ")
    assert (
        f"{questions}:1:user_id: `user_id` is empty; an empty user names no one (reports show each example's "
        "user; compare pairs examples by user and target). Fix: give the user's id, or remove `user_id` (the "
        "question's id is then the user)\n"
    ) in str(e.value)
    records, log = _read(dataclasses.replace(cfg, on_error="skip"))
    assert [(r.id, r.user_id) for r in records] == [("q2", "q2")]
    assert dict(log.errors) == {"empty_field": 1}


def test_a_lamp_user_id_under_a_near_name_is_read_as_context_and_counted_with_the_fix(tmp_path):
    """`userid` is not `user_id`: the question's id stays the user (as documented), and each such question
    is counted under one note naming the file, the field and the fix, for each near name the module
    docstring gives (`userId`, `user-id`); an unrelated field is not noted."""
    questions = tmp_path / "train_questions.jsonl"
    profile = [{"summary": "s", "content": "c"}]
    rows = [
        {"id": "q1", "input": "i", "output": "o", "userId": "u7", "profile": profile},
        {"id": "q2", "input": "i", "output": "o", "userId": "u7", "profile": profile},
        {"id": "q3", "input": "i", "output": "o", "user": "u8", "profile": profile},
        {"id": "q4", "input": "i", "output": "o", "user_id": "u9", "profile": profile},
        {"id": "q5", "input": "i", "output": "o", "user-id": "u10", "profile": profile},
    ]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, log = _read(DataConfig(format="lamp", template="lamp_topic_writing", sources=[str(questions)]))
    assert [(r.user_id, r.context.get("userId")) for r in records] == [
        ("q1", "u7"),
        ("q2", "u7"),
        ("q3", None),
        ("u9", None),
        ("q5", None),
    ]
    assert records[4].context["user-id"] == "u10"
    message = (
        "{}: field `{}` was read as context and the user is the question id; if it names the user, rename it "
        "`user_id`"
    )
    assert dict(log.notes) == {
        message.format(questions, "userId"): 2,
        message.format(questions, "user-id"): 1,
    }


def _generic_line(user_id: str, **fields) -> str:
    """One valid generic record (template `plain`) as a JSON line; `fields` replace or add keys."""
    return json.dumps({"user_id": user_id, "context": "c", "history": ["h"], "target": "t", **fields}) + "\n"


def test_double_star_in_a_source_pattern_matches_files_at_every_depth(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "a" / "b").mkdir(parents=True)
    for name in ("data/top.jsonl", "data/a/mid.jsonl", "data/a/b/low.jsonl"):
        (tmp_path / name).write_text(_generic_line(name))
    records, log = _read(DataConfig(format="generic", template="plain", sources=["data/**/*.jsonl"]))
    assert dict(log.read) == {"data/a/b/low.jsonl": 1, "data/a/mid.jsonl": 1, "data/top.jsonl": 1}
    assert len(records) == 3


def test_a_file_named_twice_in_other_spellings_is_read_once(tmp_path, monkeypatch):
    """Relative, absolute, through `..`, through a symlink, and by an overlapping glob: one file, read once
    under the spelling that named it first."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "g1.jsonl").write_text(_generic_line("u1") + _generic_line("u2"))
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "g1.jsonl")
    (tmp_path / "g2.jsonl").write_text(_generic_line("u3"))
    sources = ["g1.jsonl", str(tmp_path / "g1.jsonl"), "sub/../g1.jsonl", "link.jsonl", "*.jsonl"]
    records, log = _read(DataConfig(format="generic", template="plain", sources=sources))
    assert dict(log.read) == {"g1.jsonl": 2, "g2.jsonl": 1}
    assert [r.user_id for r in records] == ["u1", "u2", "u3"] and dict(log.dropped) == {}


def test_a_generic_record_repeated_in_another_file_is_dropped_and_counted(tmp_path):
    """A copied file repeats every record; a record of another split is not a repeat."""
    g1 = tmp_path / "g1.jsonl"
    g1.write_text(_generic_line("u1") + _generic_line("u2"))
    copy = tmp_path / "copy.jsonl"
    shutil.copy(g1, copy)
    other = tmp_path / "other.jsonl"
    other.write_text(_generic_line("u1", split="test") + _generic_line("u2"))
    sources = [str(g1), str(copy), str(other)]
    records, log = _read(DataConfig(format="generic", template="plain", sources=sources))
    assert [(r.user_id, r.split, r.source) for r in records] == [
        ("u1", "train", f"{g1}:1"),
        ("u2", "train", f"{g1}:2"),
        ("u1", "test", f"{other}:1"),
    ]
    assert dict(log.dropped) == {"duplicate": 3}


def test_a_dpl_row_repeated_in_another_file_of_its_category_is_dropped_and_counted(tmp_path):
    """A copy of a split file in the same category repeats its rows; in another category's directory the same
    rows are that category's (the protocol runs per category), so they are kept."""
    train = FIXTURES / "dpl" / "Books" / "train.jsonl"
    for name in ("Books/train.jsonl", "Books/train_copy.jsonl", "Movies/train.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(train, tmp_path / name)
    meta = [str(FIXTURES / "dpl" / "meta" / "Books.jsonl")]
    records, log = _read(DataConfig(format="dpl", sources=[str(tmp_path / "*" / "*.jsonl")], meta=meta))
    # The fixture's 4 rows, each once per category; the copy's 4 are repeats.
    books, movies = tmp_path / "Books" / "train.jsonl", tmp_path / "Movies" / "train.jsonl"
    assert [r.source for r in records] == [f"{f}:{i}" for f in (books, movies) for i in range(1, 5)]
    assert dict(log.dropped) == {"duplicate": 4}


def test_dpl_ids_are_unique_across_the_files_of_a_split_and_the_rows_of_a_one_line_json_array(tmp_path):
    """Two files of one split in one category, and a `.json` array on one line (every row at line 1), give
    every record its own id: category, file name, user and the row's number in its file. Before, both files
    numbered their rows from line 1 and the array's rows all had line 1, so `compare` refused the data."""
    rows = _rows(FIXTURES / "dpl" / "Books" / "train.jsonl")
    (tmp_path / "Books").mkdir()
    (tmp_path / "Movies").mkdir()
    (tmp_path / "Books" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp_path / "Books" / "train_part2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    (tmp_path / "Movies" / "train.json").write_text(json.dumps(rows) + "\n")
    sources = [str(tmp_path / "Books" / "*.jsonl"), str(tmp_path / "Movies" / "train.json")]
    meta = [str(FIXTURES / "dpl" / "meta" / "Books.jsonl")]
    records, log = _read(DataConfig(format="dpl", sources=sources, meta=meta))
    assert [r.id for r in records] == [
        "Books/train.jsonl/U1/1",
        "Books/train.jsonl/U3/2",
        "Books/train_part2.jsonl/U4/1",
        "Books/train_part2.jsonl/U2/2",
        "Movies/train.json/U1/1",
        "Movies/train.json/U3/2",
        "Movies/train.json/U4/3",
        "Movies/train.json/U2/4",
    ]
    assert [r.source for r in records[4:]] == [
        f"{tmp_path / 'Movies' / 'train.json'}:1 (row {i})" for i in range(1, 5)
    ]
    assert dict(log.errors) == {} and dict(log.dropped) == {}


def test_a_dpl_id_given_twice_by_same_named_files_in_same_named_directories_is_invalid(tmp_path):
    """`a/Books/train.jsonl` and `b/Books/train.jsonl` are both category Books's `train.jsonl`: a row of one
    and the row at its place in the other get one id. Another row there is invalid (`duplicate_id`, naming
    both places and a fix the user can make, as the reader makes the ids); the same row again is a repeat."""
    rows = _rows(FIXTURES / "dpl" / "Books" / "train.jsonl")
    a, b = tmp_path / "a" / "Books" / "train.jsonl", tmp_path / "b" / "Books" / "train.jsonl"
    for path, lines in ((a, rows[:2]), (b, [rows[0], {**rows[2], "user_id": "U3"}])):
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = DataConfig(
        format="dpl", sources=[str(a), str(b)], meta=[str(FIXTURES / "dpl" / "meta" / "Books.jsonl")]
    )
    with pytest.raises(DataError) as e:
        _read(cfg)
    assert str(e.value).startswith("1 invalid input record(s) (1 duplicate_id); nothing was prepared:\n  ")
    assert (
        f"{b}:2:id: the id 'Books/train.jsonl/U3/2' is already the id of the record at {a}:2; ids must be "
        "unique across all files and splits (compare pairs examples by id). Fix: rename one of the files (a "
        "DPL record's id is its category, file name, user and row number)\n"
    ) in str(e.value)
    records, log = _read(dataclasses.replace(cfg, on_error="skip"))
    assert [r.source for r in records] == [f"{a}:1", f"{a}:2"]
    assert dict(log.errors) == {"duplicate_id": 1} and dict(log.dropped) == {"duplicate": 1}


def test_a_lamp_question_repeated_in_another_file_of_its_split_is_dropped_and_counted(tmp_path):
    """Questions are told apart by id within a split (golds are matched so); the same id in another split's
    file is another question."""
    profile = [{"summary": "s", "content": "c"}]
    line = lambda qid: json.dumps({"id": qid, "input": "i", "output": "o", "profile": profile}) + "\n"
    files = {
        "train_questions.jsonl": "q1 q2",
        "train_more_questions.jsonl": "q2 q3",
        "dev_questions.jsonl": "q1",
    }
    for name, ids in files.items():
        (tmp_path / name).write_text("".join(line(qid) for qid in ids.split()))
    sources = [str(tmp_path / name) for name in files]
    records, log = _read(DataConfig(format="lamp", template="lamp_topic_writing", sources=sources))
    assert [(r.split, r.id) for r in records] == [
        ("train", "q1"),
        ("train", "q2"),
        ("train", "q3"),
        ("val", "q1"),
    ]
    assert dict(log.dropped) == {"duplicate": 1}


def test_a_generic_id_that_an_earlier_record_has_is_invalid_in_any_file_or_split(tmp_path):
    """Another record under an earlier record's id is invalid (compare could not pair it); an exact repeat,
    id and all, is only a repeat; records without an id are not compared."""
    a = tmp_path / "a.jsonl"
    a.write_text(_generic_line("u1", id="X") + _generic_line("u2", id="Y") + _generic_line("u5"))
    b = tmp_path / "b.jsonl"
    b.write_text(
        _generic_line("u3", id="X", split="test") + _generic_line("u1", id="X") + _generic_line("u4")
    )
    cfg = DataConfig(format="generic", template="plain", sources=[str(a), str(b)])
    with pytest.raises(DataError) as e:
        _read(cfg)
    assert str(e.value).startswith("1 invalid input record(s) (1 duplicate_id); nothing was prepared:\n  ")
    assert (
        f"{b}:1:id: the id 'X' is already the id of the record at {a}:1; ids must be unique across all files"
        " and splits (compare pairs examples by id). Fix: give one of them another id\n"
    ) in str(e.value)
    records, log = _read(dataclasses.replace(cfg, on_error="skip"))
    assert [r.source for r in records] == [f"{a}:1", f"{a}:2", f"{a}:3", f"{b}:3"]
    assert dict(log.errors) == {"duplicate_id": 1} and dict(log.dropped) == {"duplicate": 1}


def test_a_lamp_gold_for_a_question_with_an_inline_output_is_counted_as_ignored(tmp_path, tiny_tokenizer):
    """A question with an inline `output` is answered by it, as before; a gold for it in the outputs files
    goes unused and is counted (`dropped.gold_ignored_inline_output`), also in the prepare summary and its
    message, where it used to be ignored without a word. The inline output is the target, not context (a
    template inserting every context field would put the answer in the prompt). A later copy of the
    question without `output` is a repeat, dropped; the question kept is still the one answered inline."""
    tw = tmp_path / "topic_writing"
    shutil.copytree(FIXTURES / "lamp" / "topic_writing", tw)
    questions = json.loads((tw / "dev_questions.json").read_text())
    assert questions[0]["id"] == "tw-101"
    without_output = dict(questions[0])
    questions[0]["output"] = "The inline answer."
    (tw / "dev_questions.json").write_text(json.dumps(questions, indent=1))
    cfg = _topic_writing_cfg(tw)
    records, log = _read(cfg)
    assert [r.id for r in records] == ["tw-101", "tw-102"] and records[0].target == "The inline answer."
    assert records[1].target.startswith("The jitters got old")  # from its gold, as before
    assert records[0].context == {"input": questions[0]["input"]}  # `id`, `output` and the profile are not
    assert dict(log.dropped) == {"empty_history": 1, "gold_ignored_inline_output": 1}
    said = []
    summary = prepare(cfg, tmp_path / "prepared", tokenizer=tiny_tokenizer(), echo=said.append)
    assert summary["dropped"] == {"empty_history": 1, "gold_ignored_inline_output": 1}
    assert "  dropped: empty_history 1, gold_ignored_inline_output 1" in said[-1].splitlines()
    # tw-101 again at the end, without `output`: dropped as a repeat of the first tw-101, whose inline output
    # still answers it, so its gold is still unused (tw-103, with no profile, is dropped as before).
    (tw / "dev_questions.json").write_text(json.dumps([*questions, without_output], indent=1))
    records, log = _read(cfg)
    assert [r.id for r in records] == ["tw-101", "tw-102"] and records[0].target == "The inline answer."
    assert dict(log.dropped) == {"empty_history": 1, "duplicate": 1, "gold_ignored_inline_output": 1}


def test_lamp_golds_repeated_conflicting_or_without_a_question_are_counted_or_invalid(tmp_path):
    """A gold id given twice in a split: the same output is a counted repeat, another output is invalid
    (naming both places); golds no question of their split asks for are counted, per split."""
    profile = [{"summary": "s", "content": "c"}]
    questions = tmp_path / "train_questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"id": q, "input": "i", "profile": profile}) + "\n" for q in "abd")
    )
    golds = lambda *pairs: [{"id": q, "output": o} for q, o in pairs]
    first = tmp_path / "train_outputs.json"
    first.write_text(json.dumps({"task": "t", "golds": golds(("a", "oa"), ("b", "ob"))}, indent=1))
    more = tmp_path / "train_more_outputs.jsonl"
    more.write_text("".join(json.dumps(g) + "\n" for g in golds(("a", "oa"), ("b", "other"), ("z", "oz"))))
    (tmp_path / "dev_outputs.jsonl").write_text(json.dumps({"id": "a", "output": "oa"}) + "\n")
    meta = [str(first), str(more), str(tmp_path / "dev_outputs.jsonl")]
    cfg = DataConfig(format="lamp", template="lamp_topic_writing", sources=[str(questions)], meta=meta)
    with pytest.raises(DataError) as e:
        _read(cfg)
    msg = str(e.value)
    assert msg.startswith("2 invalid input record(s) (1 duplicate_id, 1 missing_field)"), msg
    # `b`'s element starts on line 8 of the indented array.
    assert (
        f"{more}:2:id: the train gold 'b' was given before, with another output, at {first}:8; a question "
        "has one gold. Fix: remove the wrong one, or correct its id\n"
    ) in msg
    assert (
        f"{questions}:3:output: question 'd' has no inline `output` and no gold with this id in the train "
        "outputs files (data.meta)\n"
    ) in msg
    records, log = _read(dataclasses.replace(cfg, on_error="skip"))
    assert [(r.id, r.target) for r in records] == [("a", "oa"), ("b", "ob")]
    assert dict(log.errors) == {"duplicate_id": 1, "missing_field": 1}
    assert dict(log.dropped) == {"gold_duplicate": 1, "gold_without_question": 2}


def test_lamp_golds_are_the_top_level_array_when_a_nested_key_is_named_golds_first(tmp_path):
    """The golds array was found by searching the text for `"golds"`: a nested key of that name earlier in
    the file sent the reader to another array, and it failed with a traceback naming no file."""
    profile = [{"summary": "s", "content": "c"}]
    questions = tmp_path / "train_questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"id": q, "input": "i", "profile": profile}) + "\n" for q in "ab")
    )
    outputs = tmp_path / "train_outputs.json"
    golds = [{"id": "a", "output": "oa"}, {"id": "b", "output": " "}]
    layout = {"task": "t", "config": {"golds": "see below"}, "splits": ["train"], "golds": golds}
    outputs.write_text(json.dumps(layout, indent=1))
    assert outputs.read_text().splitlines()[13] == "  {"  # gold `b` starts on line 14
    cfg = DataConfig(
        format="lamp", template="lamp_topic_writing", sources=[str(questions)], meta=[str(outputs)]
    )
    with pytest.raises(DataError) as e:
        _read(cfg)
    assert f"{outputs}:14:output: `output` is empty" in str(e.value)
    records, _ = _read(dataclasses.replace(cfg, on_error="skip"))
    assert [(r.id, r.target) for r in records] == [("a", "oa")]
    # A repeated key: JSON decoders keep the last value, and its rows are located in that array.
    outputs.write_text('{"golds": [],\n"golds": [\n{"id": "a", "output": "oa"},\n{"id": "b", "output": ""}]}')
    with pytest.raises(DataError) as e:
        _read(cfg)
    assert f"{outputs}:4:output: `output` is empty" in str(e.value)


def test_an_empty_lamp_gold_is_named_where_it_was_read_in_the_outputs_file(tmp_path):
    """Question `q` (line 1 of the questions file) takes its gold from the outputs file, where that gold's
    output is empty (line 2): the error names the outputs file, its line and field, and the question."""
    profile = [{"summary": "s", "content": "c"}]
    questions = tmp_path / "train_questions.jsonl"
    questions.write_text(json.dumps({"id": "q", "input": "i", "profile": profile}) + "\n")
    outputs = tmp_path / "train_outputs.jsonl"
    outputs.write_text(
        json.dumps({"id": "other", "output": "o"}) + "\n" + json.dumps({"id": "q", "output": " "})
    )
    cfg = DataConfig(
        format="lamp", template="lamp_topic_writing", sources=[str(questions)], meta=[str(outputs)]
    )
    with pytest.raises(DataError) as e:
        _read(cfg)
    assert (
        f"{outputs}:2:output: `output` is empty; the example would learn only the end-of-text token. Fix: "
        f"give the output text, or remove the question (question 'q' at {questions}:1)"
    ) in str(e.value)


def test_an_optional_field_set_to_null_is_absent(tmp_path):
    """Parquet fills a column's missing values with null, and JSON writers often do: null `split`, `id`,
    `category`, `meta`, entry `timestamp` (generic) and inline `output`, `user_id` (lamp) mean absent."""
    nulls = dict(split=None, id=None, category=None, meta=None)
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text(_generic_line("u1", history=[{"text": "h", "timestamp": None}], **nulls))
    parquet = tmp_path / "records.parquet"
    rows = [
        {"user_id": "u2", "context": "c", "history": ["h"], "target": "t", "split": "test", "id": "A"},
        {"user_id": "u3", "context": "c", "history": ["h"], "target": "t", "split": None, "id": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    cfg = DataConfig(
        format="generic", template="plain", sources=[str(jsonl), str(parquet)], default_split="val"
    )
    records, _ = _read(cfg)
    assert [(r.user_id, r.split, r.id, r.category, r.meta) for r in records] == [
        ("u1", "val", "", "", None),
        ("u2", "test", "A", "", None),
        ("u3", "val", "", "", None),
    ]
    assert records[0].history[0].timestamp is None

    questions = tmp_path / "train_questions.jsonl"
    question = {"id": "q1", "input": "i", "output": None, "user_id": None, "profile": [{"summary": "s"}]}
    questions.write_text(json.dumps(question) + "\n")
    outputs = tmp_path / "train_outputs.jsonl"
    outputs.write_text(json.dumps({"id": "q1", "output": "gold"}) + "\n")
    cfg = DataConfig(format="lamp", template="plain", sources=[str(questions)], meta=[str(outputs)])
    records, log = _read(cfg)
    assert [(r.user_id, r.target) for r in records] == [("q1", "gold")] and dict(log.notes) == {}


@pytest.mark.parametrize(
    ("fields", "where", "got"),
    [
        ({"context": {"item_title": ["a", "b"]}}, "context.item_title", "list ['a', 'b']"),
        ({"context": {"rating": True}}, "context.rating", "bool True"),
        ({"history": [{"text": "h", "tags": {"x": 1}}]}, "history[0].tags", "dict {'x': 1}"),
    ],
)
def test_a_generic_field_that_is_no_string_or_number_says_what_it_got_and_the_fix(
    tmp_path, fields, where, got
):
    """As the other type errors do (`history` must be a list, got str ...): the value's type and repr, and
    the fix, where it used to say only that it must be a string or a number."""
    path = tmp_path / "records.jsonl"
    path.write_text(_generic_line("u", **fields))
    with pytest.raises(DataError) as e:
        _read(DataConfig(format="generic", template="plain", sources=[str(path)]))
    assert (
        f"{path}:1:{where}: `{where}` must be a string or a number, got {got}; the prompt inserts it as text."
        " Fix: write it as one string (a list joined, say), or move it into the record's `meta` (carried"
        " through, not in the prompt)\n"
    ) in str(e.value)


def _not_finite_dpl(tmp_path: Path, where: str, spelt: str) -> DataConfig:
    """The DPL fixture's train file with the number at `where` (`data.rating`, `profile[0].timestamp`) spelt
    `spelt` in its first row."""
    rows = (FIXTURES / "dpl" / "Books" / "train.jsonl").read_text().splitlines()
    first = json.loads(rows[0])
    review, name = where.split(".")
    (first["data"] if review == "data" else first["profile"][0])[name] = "NUMBER"
    path = tmp_path / "Books" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join([json.dumps(first).replace('"NUMBER"', spelt), *rows[1:]]) + "\n")
    return DataConfig(
        format="dpl", sources=[str(path)], meta=[str(FIXTURES / "dpl" / "meta" / "Books.jsonl")]
    )


def _not_finite_lamp(tmp_path: Path, where: str, spelt: str) -> DataConfig:
    """One LaMP topic-writing question whose field `where` (`profile[0].content`, or a question field) is the
    number spelt `spelt`."""
    question = {"id": "q1", "input": "i", "output": "o", "profile": [{"summary": "s", "content": "c"}]}
    if where.startswith("profile[0]."):
        question["profile"][0][where.removeprefix("profile[0].")] = "NUMBER"
    else:
        question[where] = "NUMBER"
    path = tmp_path / "train_questions.jsonl"
    path.write_text(json.dumps(question).replace('"NUMBER"', spelt) + "\n")
    return DataConfig(format="lamp", template="lamp_topic_writing", sources=[str(path)])


def _not_finite_generic(tmp_path: Path, where: str, spelt: str) -> DataConfig:
    """One generic record whose number at `where` (`context.rating`, `history[0].timestamp`, ...) is spelt
    `spelt`."""
    top, name = where.split(".")
    fields = (
        {"context": {name: "NUMBER"}} if top == "context" else {"history": [{"text": "h", name: "NUMBER"}]}
    )
    path = tmp_path / "records.jsonl"
    path.write_text(_generic_line("u", **fields).replace('"NUMBER"', spelt))
    return DataConfig(format="generic", template="plain", sources=[str(path)])


def _not_finite_amazon(tmp_path: Path, where: str, spelt: str) -> DataConfig:
    """The Amazon fixture with its first review's number `where` (`rating`, `timestamp`) spelt `spelt`."""
    rows = (AMAZON / "Books.jsonl").read_text().splitlines()
    first = json.loads(rows[0])
    first[where] = "NUMBER"
    (tmp_path / "Books.jsonl").write_text(
        "\n".join([json.dumps(first).replace('"NUMBER"', spelt), *rows[1:]]) + "\n"
    )
    return DataConfig(
        format="amazon2023",
        sources=[str(tmp_path / "Books.jsonl")],
        meta=[str(AMAZON / "meta_Books.jsonl")],
    )


@pytest.mark.parametrize(
    ("config", "file", "where", "spelt", "shown", "fix"),
    [
        (_not_finite_dpl, "Books/train.jsonl", "data.rating", "Infinity", "inf", "write a finite number"),
        (_not_finite_dpl, "Books/train.jsonl", "data.rating", "1e400", "inf", "write a finite number"),
        (_not_finite_dpl, "Books/train.jsonl", "profile[0].timestamp", "NaN", "nan", "write a finite number"),
        (_not_finite_lamp, "train_questions.jsonl", "profile[0].content", "NaN", "nan", FINITE_FIX),
        (_not_finite_lamp, "train_questions.jsonl", "score", "-Infinity", "-inf", FINITE_FIX),
        (_not_finite_generic, "records.jsonl", "context.rating", "NaN", "nan", FINITE_FIX),
        (_not_finite_generic, "records.jsonl", "history[0].rating", "-Infinity", "-inf", FINITE_FIX),
        (
            _not_finite_generic,
            "records.jsonl",
            "history[0].timestamp",
            "Infinity",
            "inf",
            "write a finite number",
        ),
        (_not_finite_amazon, "Books.jsonl", "rating", "Infinity", "inf", "write a finite number"),
        (_not_finite_amazon, "Books.jsonl", "timestamp", "NaN", "nan", "write a finite number"),
    ],
)
def test_a_number_that_is_not_finite_is_refused_alike_by_every_reader(
    tmp_path, config, file, where, spelt, shown, fix
):
    """Python's JSON reader takes `NaN` and `Infinity` (and reads 1e400 as inf). The DPL and Amazon readers
    put `inf` into the prompt (`[Output Review Rating]: inf`) and the LaMP reader kept `nan` in a profile,
    where the generic reader refused them; an infinite timestamp sorted last. Every reader now refuses them
    with one message, counted as `wrong_type` under `skip`."""
    cfg = config(tmp_path, where, spelt)
    with pytest.raises(DataError) as e:
        _read(cfg)
    assert str(e.value).startswith("1 invalid input record(s) (1 wrong_type); nothing was prepared:\n  ")
    assert (
        f"{tmp_path / file}:1:{where}: `{where}` is {shown}, not a finite number (the file holds NaN or "
        "Infinity, or a number too large for a float, such as 1e400), which a prompt would show as "
        f"`{shown}`. Fix: {fix}\n"
    ) in str(e.value)
    _, log = _read(dataclasses.replace(cfg, on_error="skip"))
    assert dict(log.errors) == {"wrong_type": 1}


HUGE = "1" + "0" * 400  # an integer beyond a float's range, written without an exponent


@pytest.mark.parametrize(
    ("config", "file", "where", "fix"),
    [
        (_not_finite_dpl, "Books/train.jsonl", "data.rating", "write a finite number"),
        (_not_finite_generic, "records.jsonl", "history[0].timestamp", "write a finite number"),
        (_not_finite_generic, "records.jsonl", "context.rating", FINITE_FIX),
        (_not_finite_amazon, "Books.jsonl", "rating", "write a finite number"),
        (_not_finite_amazon, "Books.jsonl", "timestamp", "write a finite number"),
    ],
)
def test_an_integer_too_large_for_a_float_is_refused_alike_not_a_crash(tmp_path, config, file, where, fix):
    """Written without an exponent, 10**400 stays a Python int: `float()` of a rating or timestamp raised
    OverflowError, a traceback that `on_error: skip` did not catch."""
    cfg = config(tmp_path, where, HUGE)
    with pytest.raises(DataError) as e:
        _read(cfg)
    assert (
        f"{tmp_path / file}:1:{where}: `{where}` is an integer too large for a float (beyond 1.8e+308). "
        f"Fix: {fix}\n"
    ) in str(e.value)
    _, log = _read(dataclasses.replace(cfg, on_error="skip"))
    assert dict(log.errors) == {"wrong_type": 1}


def test_lines_json_cannot_read_or_that_end_in_cr_alone_are_named_with_their_cause(tmp_path):
    """An integer of more digits than Python's JSON reader converts stopped the run with Python's advice
    and no file or line; lines ended by CR alone read as one line, whose error now names the cause."""
    digits = tmp_path / "digits.jsonl"
    digits.write_text(
        _generic_line("u", context={"n": "NUMBER"}).replace('"NUMBER"', "1" * 5001) + _generic_line("v")
    )
    cfg = DataConfig(format="generic", template="plain", sources=[str(digits)], on_error="skip")
    records, log = _read(cfg)
    assert [r.user_id for r in records] == ["v"] and dict(log.errors) == {"malformed_json": 1}
    (issue,) = log.skipped["malformed_json"]
    assert issue.location == f"{digits}:1" and issue.message == (
        "not readable JSON: it holds an integer of more than 4300 digits, which Python's reader refuses. "
        "Fix: write that number as text (quoted), or remove it"
    )
    array = tmp_path / "digits.json"
    array.write_text("[" + _generic_line("u").strip() + ', {"n": ' + "1" * 5001 + "}]")
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(array))}: not readable JSON: it holds an integer"
    ):
        _read(dataclasses.replace(cfg, sources=[str(array)]))
    cr = tmp_path / "cr.jsonl"
    cr.write_text("".join(_generic_line(u).rstrip("\n") + "\r" for u in ("a", "b", "c")))
    _, log = _read(dataclasses.replace(cfg, sources=[str(cr)]))
    (issue,) = log.skipped["malformed_json"]
    assert issue.message.endswith(
        "(the line holds carriage returns (CR) alone: a file whose lines end in CR only, as old Mac editors "
        "wrote, reads as one line; convert its line endings to LF)"
    ), issue.message


def test_a_mistyped_missing_or_misplaced_generic_field_is_told_its_fix(tmp_path):
    """These named the problem and no fix (the closing line offers only `on_error: skip`). History entries
    carry a timestamp all or none (module docstring): one without it beside one with it is missing it."""
    path = tmp_path / "records.jsonl"
    path.write_text(
        _generic_line("a", split="validation")
        + _generic_line("b", split="holdout")
        + _generic_line("c", meta="notes")
        + _generic_line(7)
        + _generic_line(True)
        + json.dumps({"user_id": "d", "context": "c", "history": ["h"]}) + "\n"
        + _generic_line("e", target=None)
        + json.dumps(["a", "list"]) + "\n"
        + _generic_line("f", history=[{"text": "a", "timestamp": 1}, {"text": "b"}])
    )  # fmt: skip
    _, log = _read(DataConfig(format="generic", template="plain", sources=[str(path)], on_error="skip"))
    issues = [issue for listed in log.skipped.values() for issue in listed]
    said = {issue.location: f"{issue.field}: {issue.message}" for issue in issues}
    splits = "split: `split` must be one of ('train', 'val', 'test')"
    assert said == {
        f"{path}:1": f"{splits}, got 'validation'. Fix: write val",
        f"{path}:2": f"{splits}, got 'holdout'. Fix: write one of train, val, test, or leave it out",
        f"{path}:3": "meta: `meta` must be an object, got str 'notes'. Fix: write it as an object, or null",
        f"{path}:4": 'user_id: `user_id` must be a string, got int 7. Fix: write it as a string ("7")',
        f"{path}:5": 'user_id: `user_id` must be a string, got bool True. Fix: write it as a string ("true")',
        f"{path}:6": "target: required field `target` is missing. Fix: add it",
        f"{path}:7": "target: required field `target` is null. Fix: give its value",
        f"{path}:8": "None: each line must be a JSON object, got list. Fix: write each record as an object "
        "({...}) on a line of its own",
        f"{path}:9": "history[1].timestamp: some history entries carry a timestamp and this one does not; "
        "give all or none",
    }
    assert f"{path}:9" in {issue.location for issue in log.skipped["missing_field"]}


def test_a_null_field_of_a_context_or_entry_object_is_absent(tmp_path):
    """Parquet gives a struct column every key any row has, null where a row has none: a generic file whose
    records' contexts or entries carry different fields was refused whole (`context.rating` null, "Fix:
    remove the key", which Parquet cannot). A null field is absent, as a null optional field is; a template
    that needs it names it as missing."""
    rows = [
        {"user_id": "u1", "context": {"item_title": "A"}, "history": [{"text": "h"}], "target": "t"},
        {"user_id": "u2", "context": {"item_title": "B", "rating": 5},
         "history": [{"text": "h", "title": "x"}], "target": "t"},
    ]  # fmt: skip
    parquet = tmp_path / "records.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert pq.read_table(parquet).to_pylist()[0]["context"] == {"item_title": "A", "rating": None}
    records, _ = _read(DataConfig(format="generic", template="plain", sources=[str(parquet)]))
    assert [r.context for r in records] == [{"item_title": "A"}, {"item_title": "B", "rating": 5}]
    assert [r.history[0].fields for r in records] == [{"text": "h"}, {"text": "h", "title": "x"}]

    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text(_generic_line("u", context={"item_title": "A", "rating": None}))
    records, _ = _read(DataConfig(format="generic", template="plain", sources=[str(jsonl)]))
    assert records[0].context == {"item_title": "A"}
    with pytest.raises(DataError) as e:
        _read(DataConfig(format="generic", template="review_short", sources=[str(jsonl)]))
    assert f"{jsonl}:1:context.item_description: " in str(e.value)
    assert "context.rating" in str(e.value).split(f"{jsonl}:1:")[1].split("\n")[0], str(e.value)


def test_rows_are_numbered_by_position_and_named_by_line_past_blank_lines_in_every_format(tmp_path):
    """`Row.index` is the 0-based position among a file's rows (blank lines are none) and `only` selects by
    it; a `.jsonl` row is named by its line, blank lines counted. A byte order mark is skipped on line 1
    only: one that starts a later line is not JSON. Before, no test had a blank line before a bad row, nor
    read a Parquet file or a `.jsonl` one by position."""
    from nextquill_jax.data.sources.records import Issue
    from nextquill_jax.data.sources.rows import Row, iter_rows

    records = [{"target": t} for t in ("a", "b", "c")]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"target": "a"}\n\n{not json\n{"target": "c"}\n')
    got = list(iter_rows(jsonl))
    assert [(type(r), r.location) for r in got] == [
        (Row, f"{jsonl}:1"),
        (Issue, f"{jsonl}:3"),
        (Row, f"{jsonl}:4"),
    ]
    assert [r.index for r in got if isinstance(r, Row)] == [0, 2]
    assert [(r.location, r.value) for r in iter_rows(jsonl, only={2})] == [(f"{jsonl}:4", {"target": "c"})]
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(records))
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(records), table)
    for path in (array, table):
        assert [(r.index, r.value) for r in iter_rows(path)] == list(enumerate(records)), path
        assert [r.value for r in iter_rows(path, only={1})] == [{"target": "b"}], path
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(codecs.BOM_UTF8 + b'{"target": "a"}\n' + codecs.BOM_UTF8 + b'{"target": "b"}\n')
    first, second = iter_rows(bom)
    assert first.value == {"target": "a"}
    assert (second.reason, second.location) == ("malformed_json", f"{bom}:2"), second


def test_undecodable_lines_name_the_byte_column_and_field_and_only_a_lone_cr_gets_the_cr_hint(tmp_path):
    from nextquill_jax.data.sources.rows import iter_rows

    raw = b'{"user_id": "u", "target": "caf\x80e"}\n'
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(raw)
    (issue,) = iter_rows(path)
    column = raw.index(b"\x80") + 1  # 1-based
    assert (issue.reason, issue.field) == ("invalid_utf8", "target")
    assert issue.message == f"byte 0x80 at column {column} is not UTF-8; re-encode the file as UTF-8"
    # CRLF line endings are ordinary: a malformed line of such a file gets no hint about CR-only endings.
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b'{"target": "a"}\r\n{"target": }\r\n')
    _, bad = iter_rows(crlf)
    assert bad.message == "not valid JSON (Expecting value at column 12)", bad.message


def test_a_json_file_with_a_character_after_its_value_or_a_list_key_that_is_no_list_is_refused(tmp_path):
    from nextquill_jax.data.sources.rows import iter_rows

    path = tmp_path / "records.json"
    path.write_text('[{"target": "a"}]x')
    with pytest.raises(ValueError, match=r":1: more text after the JSON value that ends on line 1"):
        list(iter_rows(path))
    path.write_text('{"golds": 5}')
    with pytest.raises(ValueError) as e:
        list(iter_rows(path, list_key="golds"))
    assert str(e.value) == f"{path}: expected an array of objects or an object with a `golds` list, got dict"


def test_a_gzip_file_damaged_inside_is_an_error_naming_the_file(tmp_path):
    """A flipped byte in the deflate stream raises zlib.error (not BadGzipFile or EOFError), which escaped as
    a traceback naming no file when the reader did not catch it."""
    import zlib

    lines = "".join(json.dumps({"user_id": "u", "target": str(i) * 50}) + "\n" for i in range(200)).encode()
    damaged = bytearray(gzip.compress(lines, mtime=0))
    damaged[20] ^= 0xFF
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(damaged))  # what the reader meets
    path = tmp_path / "damaged.jsonl.gz"
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: cannot be decompressed \(Error -3 "):
        _read(DataConfig(format="generic", template="plain", sources=[str(path)]))


def test_read_records_refuses_settings_that_no_format_can_read(tmp_path, small_dpl):
    record = tmp_path / "records.jsonl"
    record.write_text(json.dumps({"user_id": "u", "context": "c", "history": ["h"], "target": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"^data\.sources is empty: list the input files"):
        _read(DataConfig(format="generic", template="plain"))
    with pytest.raises(ValueError, match=r"^data\.meta: the generic format takes no metadata files"):
        _read(DataConfig(format="generic", template="plain", sources=[str(record)], meta=[str(record)]))
    with pytest.raises(ValueError, match=r"^data\.meta: the dpl format needs the item metadata files"):
        _read(DataConfig(format="dpl", sources=[str(record)]))
    # `text` is an entry field of amazon2023, not a context field: a prompt cannot use it for the item
    template = dataclasses.replace(load_template("review_short"), user="[Review]: {text}\n{history}")
    with pytest.raises(ValueError, match=r"needs context fields \['text'\] that the amazon2023 format"):
        read_records(_amazon_cfg(small_dpl), template, IssueLog())
    # split words are read whatever their case
    assert [split_from_name(Path(n)) for n in ("Dev_Questions.json", "TRAIN.jsonl")] == ["val", "train"]
