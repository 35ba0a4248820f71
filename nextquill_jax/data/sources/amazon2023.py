"""Amazon Reviews 2023 raw files -> records, by the DPL benchmark's protocol (NEXTQUILL.md), per category.

Items (`meta_<Category>` rows, keyed by `parent_asin`): the description is the `description` list joined with
single spaces, a leading `Product Description` entry dropped; kept when it has 100-2000 characters and the
item has a title, categories and a rating count. Reviews: kept with text >= 200 characters (not all
whitespace), a rating, a title and a timestamp, on a kept item. Then, until the number of reviews stops
changing: items need >= 8 distinct users and users 18-500 reviews (counted after a per-user newest-first
removal of repeated items and identical texts). Texts get their whitespace collapsed and each user's reviews
are de-duplicated the same way; the last 10 (oldest first) are targets, the rest the profile. Profile reviews
of items with < 5 profile users are removed and users left with < 8 profile reviews dropped, until the number
of users stops changing. Targets 1-8 train (history = profile + earlier targets), 9 validates, 10 tests. All
thresholds come from `DataConfig.dpl_*`.

Every valid review or item row not kept is counted under a `review_*` or `item_*` reason; invalid rows are
errors (`data.on_error`), and the reviews of an item whose metadata row is invalid are counted under
`review_item_invalid`. Of metadata rows repeating a `parent_asin` (NEXTQUILL.md is silent on them) the first
decides the item and the later ones are counted (`item_duplicate`), as in the `dpl` reader.

Memory: the filters need only ids, ratings, times and a hash of each text, so the first pass keeps those (a
category of tens of millions of reviews fits in a few GB); a second pass over the file reads the title and
text of the reviews that survive.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from nextquill_jax.data.config import DataConfig
from nextquill_jax.data.sources.records import (
    HistoryEntry,
    InvalidRecordError,
    Issue,
    IssueLog,
    Record,
    get_field,
    require_text,
)
from nextquill_jax.data.sources.rows import Row, file_stem, iter_rows, valid_rows

# The fields of a record's context and of its history entries, in prompt order (also for the `dpl` format).
CONTEXT_FIELDS = ("item_title", "item_description", "rating", "title")
ENTRY_FIELDS = (*CONTEXT_FIELDS, "text")


@dataclass(frozen=True)
class Item:
    title: str
    description: str


class Review(NamedTuple):
    """What the filters need of one review; title and text are read again for the kept ones."""

    user_id: str
    asin: str
    rating: float
    timestamp: int | float
    # Hashes stand in for texts when finding a user's repeated texts: a collision between two of one user's
    # few hundred texts has probability ~1e-14.
    raw_text: int  # hash of the text as read (the protocol's repeat check inside its filter loop)
    text: int  # hash of the whitespace-collapsed text (the final repeat check)
    row: int  # position in the reviews file (`Row.index`), by which the second pass finds it


class ReviewText(NamedTuple):
    """What the second pass reads of a kept review."""

    location: str  # `Row.location`, the record's `source`
    title: str
    text: str  # whitespace collapsed


def read_amazon2023(
    review_files: list[Path], meta_files: list[Path], cfg: DataConfig, log: IssueLog
) -> list[Record]:
    """Records of every category: `<Category>.*` review files paired with `meta_<Category>.*` files.

    Raises:
        ValueError: a review file without its metadata file (or the other way round), or two review (or two
            metadata) files of the same name, naming both.
    """
    reviews = _by_name(review_files, "sources", "review")
    metas = _by_name(meta_files, "meta", "metadata")
    # Both ways checked before any file is read (a category's files take minutes at full size).
    for category, review_file in reviews.items():
        if f"meta_{category}" not in metas:
            raise ValueError(
                f"data.meta: no metadata file for reviews {review_file}; add meta_{category}.jsonl"
                " (or .jsonl.gz, .parquet) to data.meta"
            )
    lonely = sorted(str(path) for name, path in metas.items() if name.removeprefix("meta_") not in reviews)
    if lonely:
        raise ValueError(
            f"data.meta: metadata files without a review file in data.sources: {', '.join(lonely)}. Fix: add "
            "each one's <Category>.jsonl (or .jsonl.gz, .parquet) review file to data.sources, or remove it "
            "from data.meta"
        )
    records: list[Record] = []
    for category, review_file in reviews.items():
        items, known, invalid = read_items(metas[f"meta_{category}"], cfg, log)
        category_reviews = read_reviews(review_file, items, known, invalid, cfg, log)
        records.extend(dpl_protocol(category_reviews, items, review_file, category, cfg, log))
    return records


def _by_name(paths: list[Path], key: str, kind: str) -> dict[str, Path]:
    """`paths` by file name without its suffix (`file_stem`), which is all that pairs a review file with its
    metadata file.

    Raises:
        ValueError: two files of the same name (in two directories, or with two suffixes), naming both: one
            would pair with the other's reviews or metadata, or be left out.
    """
    named: dict[str, Path] = {}
    for path in paths:
        first = named.setdefault(file_stem(path), path)
        if first != path:
            raise ValueError(
                f"data.{key}: two {kind} files named {file_stem(path)}: {first} and {path}. Review and "
                "metadata files are paired by name alone (`<Category>` with `meta_<Category>`), so a "
                f"category has one of each. Fix: keep one of them in data.{key}"
            )
    return named


def item_description(description: list[str] | None) -> str:
    """The item description as the DPL protocol builds it from the metadata `description` list."""
    if not description:
        return ""
    if description[0] == "Product Description":
        description = description[1:]
    return " ".join(description)


def read_items(path: Path, cfg: DataConfig, log: IssueLog) -> tuple[dict[str, Item], set[str], set[str]]:
    """(kept items by `parent_asin`, the `parent_asin` of every valid row, that of every invalid row which
    has one)."""
    items: dict[str, Item] = {}
    known: set[str] = set()
    invalid: set[str] = set()
    for row in valid_rows(path, log):
        try:
            asin = get_field(row.value, "parent_asin", (str,), row.location)
            title = get_field(row.value, "title", (str,), row.location, nullable=True)
            parts = get_field(row.value, "description", (list,), row.location, nullable=True)
            categories = get_field(row.value, "categories", (list,), row.location, nullable=True)
            rating_number = get_field(row.value, "rating_number", (int, float), row.location, nullable=True)
            for i, part in enumerate(parts or []):
                if not isinstance(part, str):
                    raise InvalidRecordError(
                        Issue(
                            "wrong_type",
                            row.location,
                            f"description[{i}]",
                            "description entries must be strings",
                        )
                    )
        except InvalidRecordError as e:
            log.error(e.issue)
            # Its reviews are then told apart from those of items the file does not have.
            if isinstance(named := row.value.get("parent_asin"), str):
                invalid.add(named)
            continue
        if asin in known:
            log.drop("item_duplicate")
            continue
        known.add(asin)
        description = item_description(parts)
        if not cfg.dpl_min_description_chars <= len(description) <= cfg.dpl_max_description_chars:
            log.drop("item_description_length")
        elif not title:
            log.drop("item_no_title")
        elif not categories:
            log.drop("item_no_categories")
        elif not rating_number:
            log.drop("item_no_rating_count")
        else:
            items[asin] = Item(title=title, description=description)
    return items, known, invalid


def read_reviews(
    path: Path, items: dict[str, Item], known: set[str], invalid: set[str], cfg: DataConfig, log: IssueLog
) -> list[Review]:
    """Reviews that pass the review filter and name a kept item, in file order. `known`: the items of valid
    metadata rows; `invalid`: those of invalid ones, whose reviews are counted (`review_item_invalid`), as
    the metadata error names the problem, not reported each as of an item missing from the file."""
    reviews = []
    names: dict[str, str] = {}  # one string object per user / item id, however many reviews name it
    for row in valid_rows(path, log):
        try:
            user_id = require_text(
                get_field(row.value, "user_id", (str,), row.location),
                row.location,
                "user_id",
                "reviews are grouped by user, and a record's id names its user. Fix: give the user's id, or "
                "remove the row",
            )
            asin = get_field(row.value, "parent_asin", (str,), row.location)
            text = get_field(row.value, "text", (str,), row.location, nullable=True)
            rating = get_field(row.value, "rating", (int, float), row.location, nullable=True)
            title = get_field(row.value, "title", (str,), row.location, nullable=True)
            timestamp = get_field(row.value, "timestamp", (int, float), row.location, nullable=True)
        except InvalidRecordError as e:
            log.error(e.issue)
            continue
        if not text or len(text) < cfg.dpl_min_review_chars:
            log.drop("review_text_short")
        elif text.isspace():  # long enough as read, but an empty target once its whitespace is collapsed
            log.drop("review_text_blank")
        elif not rating:
            log.drop("review_no_rating")
        elif not title:
            log.drop("review_no_title")
        elif not timestamp:
            log.drop("review_no_timestamp")
        elif asin not in known and asin in invalid:
            log.drop("review_item_invalid")
        elif asin not in known:
            log.error(
                Issue(
                    "unknown_item",
                    row.location,
                    "parent_asin",
                    f"item {asin!r} is not in the metadata file; add its metadata or set data.on_error: skip",
                )
            )
        elif asin not in items:
            log.drop("review_item_filtered")
        else:
            reviews.append(
                Review(
                    user_id=names.setdefault(user_id, user_id),
                    asin=names.setdefault(asin, asin),
                    rating=float(rating),
                    timestamp=timestamp,
                    raw_text=hash(text),
                    text=hash(collapse_whitespace(text)),
                    row=row.index,
                )
            )
    return reviews


def collapse_whitespace(text: str) -> str:
    """The protocol's text clean-up, `re.sub(r"\\s+", " ", text.strip())` (str.split splits on the same
    characters, faster)."""
    return " ".join(text.split())


def dpl_protocol(
    reviews: list[Review], items: dict[str, Item], path: Path, category: str, cfg: DataConfig, log: IssueLog
) -> list[Record]:
    """The iterative filters, the per-user split and the records (train, val, test per user).

    `path` is the reviews file, read again for the title and text of the kept reviews.
    """
    reviews = _kcore(reviews, cfg, log)
    timelines = _timelines(reviews, cfg, log)
    timelines = _profile_filter(timelines, cfg, log)
    content = _title_and_text(path, {r.row for p, t in timelines.values() for r in (*p, *t)})
    records = []
    for user_id, (profile, targets) in timelines.items():
        entries = [_entry(r, items, content) for r in (*profile, *targets)]
        for k, target in enumerate(targets):
            split = "test" if k == len(targets) - 1 else "val" if k == len(targets) - 2 else "train"
            entry = entries[len(profile) + k]
            context = {name: entry.fields[name] for name in CONTEXT_FIELDS}
            records.append(
                Record(
                    user_id=user_id,
                    context=context,
                    history=tuple(entries[: len(profile) + k]),
                    target=entry.fields["text"],
                    split=split,
                    source=content[target.row].location,
                    category=category,
                    id=f"{category}/{user_id}/{k + 1}",
                    target_field="text",
                )
            )
    return records


def _kcore(reviews: list[Review], cfg: DataConfig, log: IssueLog) -> list[Review]:
    # As the public protocol: item users are counted over all reviews, user reviews after de-duplication,
    # and the filter is applied to the (not de-duplicated) review list until its length is stable.
    while True:
        by_user: dict[str, list[Review]] = defaultdict(list)
        item_users: dict[str, set[str]] = defaultdict(set)
        for r in reviews:
            by_user[r.user_id].append(r)
            item_users[r.asin].add(r.user_id)
        user_counts = {u: len(_dedup_newest_first(rs, Counter(), raw=True)) for u, rs in by_user.items()}
        kept_items = {a for a, users in item_users.items() if len(users) >= cfg.dpl_min_item_users}
        kept_users = {
            u for u, n in user_counts.items() if cfg.dpl_min_user_reviews <= n <= cfg.dpl_max_user_reviews
        }
        new = []
        for r in reviews:
            if r.asin not in kept_items:
                log.drop("review_item_too_few_users")
            elif r.user_id not in kept_users:
                log.drop("review_user_review_count")
            else:
                new.append(r)
        if len(new) == len(reviews):
            return new
        reviews = new


def _timelines(
    reviews: list[Review], cfg: DataConfig, log: IssueLog
) -> dict[str, tuple[list[Review], list[Review]]]:
    """user -> (profile, targets), both oldest first, after whitespace collapsing and de-duplication."""
    by_user: dict[str, list[Review]] = defaultdict(list)
    for r in reviews:
        by_user[r.user_id].append(r)
    timelines = {}
    for user_id, user_reviews in by_user.items():
        duplicates: Counter = Counter()
        unique = _dedup_newest_first(user_reviews, duplicates)
        for reason, n in duplicates.items():
            log.drop(reason, n)
        if len(unique) < cfg.dpl_num_targets:
            log.drop("review_user_too_few_targets", len(unique))
            continue
        oldest_first = sorted(unique, key=lambda r: r.timestamp)
        timelines[user_id] = (oldest_first[: -cfg.dpl_num_targets], oldest_first[-cfg.dpl_num_targets :])
    return timelines


def _dedup_newest_first(reviews: Iterable[Review], duplicates: Counter, *, raw: bool = False) -> list[Review]:
    """Newest first, without repeats of an item or a text (`raw`: the text as read, else collapsed)."""
    seen_items: set[str] = set()
    seen_texts: set[int] = set()
    unique = []
    for r in sorted(reviews, key=lambda r: r.timestamp, reverse=True):
        text = r.raw_text if raw else r.text
        if r.asin in seen_items:
            duplicates["review_duplicate_item"] += 1
        elif text in seen_texts:
            duplicates["review_duplicate_text"] += 1
        else:
            seen_items.add(r.asin)
            seen_texts.add(text)
            unique.append(r)
    return unique


def _profile_filter(
    timelines: dict[str, tuple[list[Review], list[Review]]], cfg: DataConfig, log: IssueLog
) -> dict[str, tuple[list[Review], list[Review]]]:
    # Stops when the number of users is stable, as the public protocol does.
    item_users = _profile_item_users(timelines)
    while True:
        kept_items = {a for a, users in item_users.items() if len(users) >= cfg.dpl_min_profile_item_users}
        new = {}
        for user_id, (profile, targets) in timelines.items():
            kept = [r for r in profile if r.asin in kept_items]
            log.drop("review_profile_item_too_few_users", len(profile) - len(kept))
            if len(kept) < cfg.dpl_min_profile_reviews:
                log.drop("review_user_profile_too_small", len(kept) + len(targets))
                continue
            new[user_id] = (kept, targets)
        item_users = _profile_item_users(new)
        if len(new) == len(timelines):
            return new
        timelines = new


def _profile_item_users(timelines: dict[str, tuple[list[Review], list[Review]]]) -> dict[str, set[str]]:
    item_users: dict[str, set[str]] = defaultdict(set)
    for user_id, (profile, _) in timelines.items():
        for r in profile:
            item_users[r.asin].add(user_id)
    return item_users


def _title_and_text(path: Path, rows: set[int]) -> dict[int, ReviewText]:
    """Position (`Row.index`) -> where, title and collapsed text of the given reviews (validated by the first
    pass)."""
    return {
        row.index: ReviewText(row.location, row.value["title"], collapse_whitespace(row.value["text"]))
        for row in iter_rows(path, only=rows)
        if isinstance(row, Row)
    }


def _entry(review: Review, items: dict[str, Item], content: dict[int, ReviewText]) -> HistoryEntry:
    item = items[review.asin]
    _, title, text = content[review.row]
    fields = {
        "item_title": item.title,
        "item_description": item.description,
        "rating": review.rating,
        "title": title,
        "text": text,
    }
    return HistoryEntry(fields=fields, timestamp=float(review.timestamp))
