"""A synthetic personalised-review benchmark whose preference-bearing tokens are known.

Every user has stable latent preferences: a few signature words (drawn from a shared pool, so which ones a
user favours can only be learnt from that user's history), two favourite aspects, a rating bias, a recurring
sign-off and a preferred length (short or long reviews). Every item has a category, a title, a description and
keywords. A review of item i by user u is built from sentences whose words have one of three roles:

    context     driven by the item or the given rating: the title, the item's kind and keywords, the sentiment
                word of the rating (all visible in the prompt without any history)
    preference  driven by the user: favourite aspects, signature words, the sign-off (visible only through the
                user's past reviews)
    noise       random filler words, unpredictable from anything

Glue words of the sentence templates carry no role. Targets are stored with `meta.target_spans` = character
spans `[start, end, role]` (sorted, disjoint, inside the target) and `meta.signature_words`, so effect
estimates can be scored against the truth.

Split per user by time like the DPL protocol: each user's reviews are ordered by timestamp; the last
`targets_per_user` are targets; all but the last two of those are training examples, the second-to-last is
validation, the last is test; each target's history is every earlier review (oldest first).

Field names follow the built-in `review` template: context {item_title, item_description, rating, title}
(title = the review's title), history entries {text, timestamp, item_title, item_description, rating, title}.

Files written to `out_dir` (the same seed gives byte-identical files):
    synthetic.jsonl   one generic record per target (the `generic` format)
    users.jsonl       every user's latent preferences (the ground truth)
    items.jsonl       every item
    manifest.json     the processors and the counts per split
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nextquill_jax.atomic_file import replaced_atomically, write_text_atomic

ASPECTS = (
    "pacing", "ending", "characters", "dialogue", "atmosphere", "humor",
    "details", "style", "structure", "mood", "tone", "opening",
)  # fmt: skip
CATEGORIES = {
    "Books": ("novel", (
        "sailors", "storms", "detectives", "letters", "gardens", "wolves", "orphans", "islands", "kings",
        "rivers", "mirrors", "castles", "soldiers", "doctors", "thieves", "lighthouses", "farms", "trains",
        "witches", "libraries", "mountains", "secrets", "maps", "ghosts",
    )),
    "Movies": ("film", (
        "heists", "aliens", "robots", "cowboys", "spies", "zombies", "pirates", "astronauts", "boxers",
        "gangsters", "dragons", "clowns", "pilots", "ninjas", "dinosaurs", "hackers", "vampires", "chefs",
        "surfers", "monks", "tigers", "lawyers", "dancers", "hunters",
    )),
    "Music": ("album", (
        "guitars", "violins", "drums", "choirs", "synths", "pianos", "trumpets", "ballads", "anthems",
        "lullabies", "harmonies", "basslines", "whistles", "organs", "strings", "chants", "horns", "banjos",
        "cellos", "flutes", "beats", "echoes", "grooves", "hymns",
    )),
}  # fmt: skip
TITLE_ADJECTIVES = (
    "Silent", "Broken", "Golden", "Hidden", "Last", "Crimson", "Distant", "Frozen", "Wild", "Quiet",
    "Burning", "Lonely", "Secret", "Electric", "Gentle", "Midnight", "Paper", "Iron", "Velvet", "Hollow",
)  # fmt: skip
TITLE_NOUNS = (
    "River", "Garden", "Crown", "Harbor", "Signal", "Forest", "Empire", "Letter", "Bridge", "Shadow",
    "Voyage", "Circle", "Winter", "Engine", "Window", "Orchard", "Tide", "Lantern", "Canyon", "Song",
)  # fmt: skip
PLACES = (
    "a small town", "the old city", "a distant coast", "the northern hills", "a busy port", "the desert",
    "a quiet valley", "the suburbs",
)  # fmt: skip
SENTIMENT = {
    1: ("awful", "terrible", "dreadful"),
    2: ("weak", "dull", "flawed"),
    3: ("decent", "average", "fair"),
    4: ("good", "enjoyable", "solid"),
    5: ("wonderful", "excellent", "superb"),
}
REVIEW_TITLES = {
    1: ("Not worth it", "Very disappointing", "Skip this one"),
    2: ("Could be better", "Not for me", "Somewhat disappointing"),
    3: ("Mixed feelings", "It was okay", "Middle of the road"),
    4: ("Pretty good", "Worth a look", "Enjoyed it"),
    5: ("Loved it", "A real gem", "Highly recommended"),
}
SIGNATURE_POOL = (
    "splendid", "marvelous", "stellar", "gorgeous", "nifty", "dandy", "riveting", "sublime", "quirky", "lush",
    "crisp", "zesty", "breezy", "haunting", "whimsical", "gritty", "plucky", "dazzling", "earnest", "mellow",
    "snappy", "brooding", "tender", "rowdy", "slick", "cozy", "spiky", "dreamy", "punchy", "moody", "jaunty",
    "frothy", "somber", "lively", "wistful", "feisty", "silky", "rugged", "serene", "bouncy", "stark",
    "glossy", "brisk", "fiery", "gloomy", "peppy", "gentle", "bold", "witty", "murky",
)  # fmt: skip
SIGN_OFFS = (
    "Cheers, friends.", "Happy reading, all!", "Just my two cents.", "Take it or leave it.",
    "Onward and upward!", "Peace out.", "Stay curious, folks.", "Over and out.", "Until next time.",
    "That is all from me.", "Enjoy, everyone!", "Thanks for reading.", "Keep it real.", "Rock on!",
    "Signing off for now.", "Have a lovely day.", "Catch you later.", "So there you go.", "Trust me on this.",
    "End of review.",
)  # fmt: skip
FILLER = (
    "today", "weekend", "package", "morning", "friend", "coffee", "rain", "train", "store", "gift", "sister",
    "office", "shelf", "box", "evening", "neighbor", "holiday", "bus", "kitchen", "dog", "cousin", "lunch",
    "garage", "winter", "summer", "birthday", "flight", "hotel", "laptop", "couch", "market", "delivery",
    "afternoon", "brother", "vacation", "porch", "library", "car", "phone", "mailbox",
)  # fmt: skip

Piece = tuple[str, str | None]  # (text, role or None for glue)


@dataclass(frozen=True)
class User:
    user_id: str
    signature_words: tuple[str, ...]
    favorite_aspects: tuple[str, ...]
    rating_bias: int
    sign_off: str
    prefers_long: bool


@dataclass(frozen=True)
class Item:
    item_id: str
    category: str
    kind: str
    title: str
    keywords: tuple[str, ...]
    description: str
    quality: int


def _pick(rng: np.random.Generator, pool, k: int | None = None):
    if k is None:
        return pool[int(rng.integers(len(pool)))]
    return tuple(pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _make_items(rng: np.random.Generator, count: int) -> list[Item]:
    items = []
    names = sorted(CATEGORIES)
    for n in range(count):
        category = names[n % len(names)]
        kind, topics = CATEGORIES[category]
        keywords = _pick(rng, topics, 4)
        title = f"The {_pick(rng, TITLE_ADJECTIVES)} {_pick(rng, TITLE_NOUNS)}"
        place = _pick(rng, PLACES)
        description = (
            f"{_article(kind).title()} {kind} about {keywords[0]}, {keywords[1]} and {keywords[2]}, "
            f"set in {place}. "
            f"It follows {keywords[3]} through changing times."
        )
        items.append(
            Item(f"item{n:05d}", category, kind, title, keywords, description, int(rng.integers(2, 6)))
        )
    return items


def _make_user(rng: np.random.Generator, n: int, signature_words: int) -> User:
    return User(
        user_id=f"user{n:05d}",
        signature_words=_pick(rng, SIGNATURE_POOL, signature_words),
        favorite_aspects=_pick(rng, ASPECTS, 2),
        rating_bias=int(rng.integers(-1, 2)),
        sign_off=_pick(rng, SIGN_OFFS),
        prefers_long=bool(rng.random() < 0.5),
    )


def _noise_sentence(rng: np.random.Generator) -> list[Piece]:
    a, b = _pick(rng, FILLER, 2)
    templates = (
        [("Got it on a ", None), (a, "noise"), (" after the ", None), (b, "noise"), (".", None)],
        [("I read up on it during my ", None), (a, "noise"), (" and ", None), (b, "noise"), (".", None)],
        [("Mentioned it to my ", None), (a, "noise"), (" over the ", None), (b, "noise"), (".", None)],
    )
    return templates[int(rng.integers(len(templates)))]


def _review(rng: np.random.Generator, user: User, item: Item, rating: int, n: int) -> list[Piece]:
    """The pieces of the user's `n`-th review (about 25-55 words); roles as in the module docstring.

    Signature words and favourite aspects are used in turn (review n uses signature word n mod k), so any
    `len(user.signature_words)` consecutive reviews show all of them."""
    kw_a, kw_b, kw_c = _pick(rng, item.keywords, 3)
    sentiment = _pick(rng, SENTIMENT[rating])
    k = len(user.signature_words)
    sig = (user.signature_words[n % k], user.signature_words[(n + 1) % k])
    aspect = user.favorite_aspects[n % len(user.favorite_aspects)]
    pieces: list[Piece] = [
        (item.title, "context"),
        (f" is {_article(sentiment)} ", None),
        (sentiment, "context"),
        (" ", None),
        (item.kind, "context"),
        (" about ", None),
        (kw_a, "context"),
        (" and ", None),
        (kw_b, "context"),
        (". The ", None),
        (aspect, "preference"),
        (" felt ", None),
        (sig[0], "preference"),
        (" to me. ", None),
    ]
    pieces += _noise_sentence(rng)
    if user.prefers_long:
        pieces += [
            (" I also noticed how the ", None),
            (kw_c, "context"),
            (" came across as ", None),
            (sig[1], "preference"),
            (". ", None),
        ]
        pieces += _noise_sentence(rng)
    pieces += [(" ", None), (user.sign_off, "preference")]
    return pieces


def render(pieces: list[Piece]) -> tuple[str, list[list]]:
    """Join pieces into the text and its role spans `[start, end, role]` (character offsets, end
    exclusive)."""
    text, spans = "", []
    for piece, role in pieces:
        if role is not None:
            spans.append([len(text), len(text) + len(piece), role])
        text += piece
    return text, spans


def generate_synthetic(
    out_dir: str | Path,
    *,
    users: int,
    seed: int,
    items: int | None = None,
    reviews_per_user: int = 12,
    targets_per_user: int = 6,
    signature_words: int = 3,
) -> dict:
    """Write the synthetic benchmark to `out_dir` (see the module docstring) and return the manifest.

    Every target's history holds at least `signature_words` reviews, and a user's reviews use the signature
    words and favourite aspects in turn, so every preference word of a target appears in its history.

    Args:
        users: number of users.
        seed: everything is drawn from `numpy.random.default_rng(seed)`; the same arguments give
            byte-identical files.
        items: catalogue size (default max(2 * reviews_per_user, users)); each user reviews distinct items.
        reviews_per_user: reviews per user, oldest first in time.
        targets_per_user: the last reviews of each user that become examples (train: all but the last two,
            then one validation and one test).
        signature_words: signature words per user (of a pool of 50).

    Sizes: tests use e.g. users=4, reviews_per_user=5, targets_per_user=3 (12 records); the demo e.g.
    users=800 (3,200 training examples of 25-55 words, a vocabulary of about 450 words).

    Raises:
        ValueError: naming the argument, for sizes that cannot form the splits.
    """
    if users < 1:
        raise ValueError(f"users must be >= 1, got {users}")
    if targets_per_user < 3:
        raise ValueError(f"targets_per_user must be >= 3 (train, val, test), got {targets_per_user}")
    if reviews_per_user <= targets_per_user:
        raise ValueError(
            f"reviews_per_user ({reviews_per_user}) must exceed targets_per_user ({targets_per_user}) so "
            f"every target has a history"
        )
    if not 2 <= signature_words <= len(SIGNATURE_POOL):
        raise ValueError(f"signature_words must be in [2, {len(SIGNATURE_POOL)}], got {signature_words}")
    if reviews_per_user - targets_per_user < signature_words:
        raise ValueError(
            f"reviews_per_user - targets_per_user ({reviews_per_user - targets_per_user}) must be >= "
            f"signature_words ({signature_words}) so every history shows all of a user's signature words"
        )
    n_items = items if items is not None else max(2 * reviews_per_user, users)
    if n_items < reviews_per_user:
        raise ValueError(f"items ({n_items}) must be >= reviews_per_user ({reviews_per_user})")
    rng = np.random.default_rng(seed)
    catalogue = _make_items(rng, n_items)
    people = [_make_user(rng, n, signature_words) for n in range(users)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # manifest.json, written last, says the files beside it are whole: an earlier one must not stand for
    # files a stopped run (SIGKILL) left half-replaced (each file is replaced whole, but not all at once).
    (out / "manifest.json").unlink(missing_ok=True)
    counts = {"train": 0, "val": 0, "test": 0}
    with (
        replaced_atomically(out / "synthetic.jsonl") as tmp,
        open(tmp, "w", encoding="utf-8", newline="\n") as f,
    ):
        for user in people:
            chosen = rng.choice(n_items, size=reviews_per_user, replace=False)
            gaps = rng.integers(1, 30, size=reviews_per_user) * 86_400
            times = 1_600_000_000 + int(rng.integers(0, 86_400 * 365)) + np.cumsum(gaps)
            timeline = []
            for n, (idx, ts) in enumerate(zip(chosen, times, strict=True)):
                item = catalogue[int(idx)]
                jitter = int(rng.choice([-1, 0, 0, 0, 1]))
                rating = int(np.clip(item.quality + user.rating_bias + jitter, 1, 5))
                text, spans = render(_review(rng, user, item, rating, n))
                entry = {
                    "text": text,
                    "timestamp": int(ts),
                    "item_title": item.title,
                    "item_description": item.description,
                    "rating": float(rating),
                    "title": _pick(rng, REVIEW_TITLES[rating]),
                }
                timeline.append((entry, spans, item))
            first_target = reviews_per_user - targets_per_user
            for t in range(first_target, reviews_per_user):
                entry, spans, item = timeline[t]
                split = (
                    "test" if t == reviews_per_user - 1 else "val" if t == reviews_per_user - 2 else "train"
                )
                counts[split] += 1
                record = {
                    "id": f"{user.user_id}-{t:03d}",
                    "user_id": user.user_id,
                    "category": item.category,
                    "split": split,
                    "context": {k: entry[k] for k in ("item_title", "item_description", "rating", "title")},
                    "history": [e for e, _, _ in timeline[:t]],
                    "target": entry["text"],
                    "meta": {
                        "item_id": item.item_id,
                        "timestamp": entry["timestamp"],
                        "target_spans": spans,
                        "signature_words": list(user.signature_words),
                        "favorite_aspects": list(user.favorite_aspects),
                        "sign_off": user.sign_off,
                    },
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    _write_jsonl(out / "users.jsonl", [_user_row(u) for u in people])
    _write_jsonl(out / "items.jsonl", [_item_row(i) for i in catalogue])
    manifest = {
        "seed": seed,
        "users": users,
        "items": n_items,
        "reviews_per_user": reviews_per_user,
        "targets_per_user": targets_per_user,
        "signature_words": signature_words,
        "records": counts,
        "files": ["synthetic.jsonl", "users.jsonl", "items.jsonl"],
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def _user_row(u: User) -> dict:
    return {
        "user_id": u.user_id,
        "signature_words": list(u.signature_words),
        "favorite_aspects": list(u.favorite_aspects),
        "rating_bias": u.rating_bias,
        "sign_off": u.sign_off,
        "prefers_long": u.prefers_long,
    }


def _item_row(i: Item) -> dict:
    return {
        "item_id": i.item_id,
        "category": i.category,
        "title": i.title,
        "description": i.description,
        "keywords": list(i.keywords),
        "quality": i.quality,
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
