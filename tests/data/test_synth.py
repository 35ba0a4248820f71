"""The synthetic benchmark: deterministic, DPL-style per-user time split, consistent role spans."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest

from nextquill_jax.data.sources.synth import SENTIMENT, generate_synthetic

ROLES = {"preference", "context", "noise"}
TINY = dict(users=6, seed=3, reviews_per_user=7, targets_per_user=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = generate_synthetic(out, **TINY)
    records = [
        json.loads(line) for line in (out / "synthetic.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    return out, manifest, records


def test_same_seed_gives_identical_files_and_another_seed_does_not(tiny, tmp_path):
    out, manifest, _ = tiny
    generate_synthetic(tmp_path / "again", **TINY)
    for name in [*manifest["files"], "manifest.json"]:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    generate_synthetic(tmp_path / "other", **{**TINY, "seed": 4})
    assert (tmp_path / "other" / "synthetic.jsonl").read_bytes() != (out / "synthetic.jsonl").read_bytes()


def test_role_spans_lie_inside_the_target_and_do_not_overlap(tiny):
    _, _, records = tiny
    for rec in records:
        target, spans = rec["target"], rec["meta"]["target_spans"]
        assert {role for _, _, role in spans} == ROLES, rec["id"]
        previous_end = 0
        for start, end, role in spans:
            assert role in ROLES
            assert previous_end <= start < end <= len(target), (rec["id"], start, end)
            piece = target[start:end]
            assert piece == piece.strip() and piece, (rec["id"], piece)
            previous_end = end
        preference = [target[s:e] for s, e, role in spans if role == "preference"]
        assert preference[-1] == rec["meta"]["sign_off"] and target.endswith(rec["meta"]["sign_off"])
        # Every occurrence of a signature word in the target is covered by a preference span.
        for word in rec["meta"]["signature_words"]:
            for m in re.finditer(rf"\b{word}\b", target):
                assert any(s <= m.start() and m.end() <= e and r == "preference" for s, e, r in spans)
        words = len(target.split())
        assert 20 <= words <= 60, (rec["id"], words)


def test_split_per_user_by_time_with_history_before_the_target(tiny):
    _, manifest, records = tiny
    by_user = defaultdict(list)
    for rec in records:
        by_user[rec["user_id"]].append(rec)
    assert len(by_user) == TINY["users"]
    first = TINY["reviews_per_user"] - TINY["targets_per_user"]
    for recs in by_user.values():
        assert [r["split"] for r in recs] == ["train"] * (TINY["targets_per_user"] - 2) + ["val", "test"]
        for k, rec in enumerate(recs):
            times = [h["timestamp"] for h in rec["history"]]
            assert len(times) == first + k and times == sorted(times) and times[-1] < rec["meta"]["timestamp"]
            assert set(rec["context"]) == {"item_title", "item_description", "rating", "title"}
            assert all(set(h) == {"text", "timestamp", *rec["context"]} for h in rec["history"])
        # Earlier targets are part of the later targets' history, as in the DPL protocol.
        assert recs[-1]["history"][-1]["text"] == recs[-2]["target"]
    n = TINY["users"]
    assert manifest["records"] == {"train": n * (TINY["targets_per_user"] - 2), "val": n, "test": n}


def test_preference_words_are_visible_in_the_history_but_not_in_the_context(tiny):
    out, _, records = tiny
    users = [json.loads(line) for line in (out / "users.jsonl").read_text().splitlines()]
    assert len({tuple(sorted(u["signature_words"])) for u in users}) > 1  # users differ: history is needed
    for rec in records:
        history_text = " ".join(h["text"] for h in rec["history"])
        context_text = json.dumps(rec["context"])
        target = rec["target"]
        for s, e, role in rec["meta"]["target_spans"]:
            if role == "preference":
                assert target[s:e] in history_text, (rec["id"], target[s:e])
                assert target[s:e] not in context_text
            if role == "context" and target[s:e] not in context_text:
                # Context words not copied from the prompt express the rating given in the prompt.
                assert target[s:e] in SENTIMENT[int(rec["context"]["rating"])], (rec["id"], target[s:e])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"users": 0}, "users"),
        ({"targets_per_user": 2}, "targets_per_user"),
        ({"reviews_per_user": 4}, "exceed"),
    ],
)
def test_bad_sizes_are_refused_naming_the_argument(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        generate_synthetic(tmp_path, **{**TINY, **kw})


def test_a_run_stopped_part_way_leaves_the_earlier_files_whole_and_no_manifest(tmp_path, monkeypatch):
    """synthetic.jsonl was written in place: a run killed part-way left it cut at a line (so every line still
    parsed, and `data prepare` read the cut file without a word) beside the earlier run's manifest."""
    from nextquill_jax.data.sources import synth

    out = tmp_path / "synth"
    generate_synthetic(out, users=4, seed=0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    reviews, review = [0], synth._review

    def stopping(*args, **kwargs):
        reviews[0] += 1
        if reviews[0] == 30:  # in the third user's reviews
            raise KeyboardInterrupt
        return review(*args, **kwargs)

    monkeypatch.setattr(synth, "_review", stopping)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(out, users=8, seed=1)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(after) == sorted(set(before) - {"manifest.json"})  # no temporary file left
    assert all(after[name] == before[name] for name in after)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"signature_words": 1}, r"signature_words must be in \[2, 50\]"),
        ({"signature_words": 51}, r"signature_words must be in \[2, 50\]"),
        ({"reviews_per_user": 6}, r"signature_words \(3\)"),  # 6 - 4 = 2 earlier reviews < 3 words
        ({"items": 6}, r"items \(6\) must be >= reviews_per_user \(7\)"),
    ],
)
def test_sizes_that_break_the_history_or_the_catalogue_are_refused(tmp_path, kw, match):
    """Each check of generate_synthetic refuses its own case with its own message (mutations that survived
    before: the signature_words bounds `2 <=` -> `1 <=`, dropping the reviews - targets >= signature_words
    check, dropping the items >= reviews_per_user check, whose numpy error named no argument)."""
    with pytest.raises(ValueError, match=match):
        generate_synthetic(tmp_path, **{**TINY, **kw})


def test_catalogue_defaults_to_twice_the_reviews_and_cycles_the_categories(tiny):
    """items defaults to max(2 * reviews_per_user, users) = max(14, 6) = 14, the manifest records that
    number, item n has category sorted(CATEGORIES)[n % 3] and its description starts with the kind and
    its article ("A novel", "A film", "An album"). Mutations that survived before: the default
    `2 * reviews_per_user` -> `reviews_per_user`, manifest "items" = the argument (None), every item
    in the first category, `_article` always returning "a"."""
    out, manifest, records = tiny
    items = [json.loads(line) for line in (out / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    assert manifest["items"] == 14 and len(items) == 14
    opening = {"Books": "A novel about ", "Movies": "A film about ", "Music": "An album about "}
    for n, item in enumerate(items):
        assert item["item_id"] == f"item{n:05d}"
        assert item["category"] == ["Books", "Movies", "Music"][n % 3]
        assert item["description"].startswith(opening[item["category"]]), item
    # The sentiment word after " is " takes "an" before a vowel ("awful", "excellent", ...), else "a".
    for rec in records:
        target = rec["target"]
        for s, e, role in rec["meta"]["target_spans"]:
            word = target[s:e]
            if role == "context" and any(word in words for words in SENTIMENT.values()):
                article = "an" if word[0] in "aeiou" else "a"
                assert target[:s].endswith(f" is {article} "), (rec["id"], target[: e + 1])


def test_users_latent_preferences_shape_their_reviews(tiny):
    """The meta of each record matches the user's row in users.jsonl; every signature word and both
    favourite aspects appear in every target's history (used in turn, history >= 3 reviews); a user who
    prefers long reviews writes the second sentence pair (4 noise and 4 preference spans: aspect, 2
    signature words, sign-off) and one who does not writes 2 noise and 3 preference spans; each user reviews
    distinct items. Mutations that survived before: meta signature_words cut to the first, signature word /
    aspect always the first (not in turn), `if user.prefers_long` negated, items drawn with replacement."""
    out, _, records = tiny
    users = {
        u["user_id"]: u
        for u in map(json.loads, (out / "users.jsonl").read_text(encoding="utf-8").splitlines())
    }
    assert {u["prefers_long"] for u in users.values()} == {True, False}  # both kinds are checked
    by_user = defaultdict(list)
    for rec in records:
        user, meta = users[rec["user_id"]], rec["meta"]
        for key in ("signature_words", "favorite_aspects", "sign_off"):
            assert meta[key] == user[key], (rec["id"], key)
        history_text = " ".join(h["text"] for h in rec["history"])
        for word in [*user["signature_words"], *user["favorite_aspects"]]:
            assert re.search(rf"\b{word}\b", history_text), (rec["id"], word)
        roles = [role for _, _, role in meta["target_spans"]]
        expected = (4, 4) if user["prefers_long"] else (2, 3)
        assert (roles.count("noise"), roles.count("preference")) == expected, rec["id"]
        by_user[rec["user_id"]].append(rec)
    for recs in by_user.values():
        last = recs[-1]
        reviewed = [(h["item_title"], h["item_description"]) for h in last["history"]]
        reviewed.append((last["context"]["item_title"], last["context"]["item_description"]))
        assert len(reviewed) == TINY["reviews_per_user"] and len(set(reviewed)) == len(reviewed)


def test_a_rating_is_the_item_quality_plus_the_user_bias_within_one_and_reaches_five(tiny):
    """rating = clip(quality + rating_bias + jitter, 1, 5) with jitter in {-1, 0, 1}: within 1 of
    clip(quality + bias, 1, 5), and 5 whenever quality + bias >= 6 (the smallest jitter still leaves >= 5).
    Mutation that survived before: the clip's upper bound 5 -> 4."""
    out, _, records = tiny
    quality = {
        i["item_id"]: i["quality"]
        for i in map(json.loads, (out / "items.jsonl").read_text(encoding="utf-8").splitlines())
    }
    bias = {
        u["user_id"]: u["rating_bias"]
        for u in map(json.loads, (out / "users.jsonl").read_text(encoding="utf-8").splitlines())
    }
    top = 0
    for rec in records:
        base = quality[rec["meta"]["item_id"]] + bias[rec["user_id"]]
        rating = rec["context"]["rating"]
        assert rating in {1.0, 2.0, 3.0, 4.0, 5.0}
        assert abs(rating - min(max(base, 1), 5)) <= 1, rec["id"]
        if base >= 6:
            assert rating == 5.0, rec["id"]
            top += 1
    assert top > 0  # the seed holds such a case, so the upper bound is exercised
