"""Readers of the source formats -> :class:`~data_shards.interactions.RawInteractions`.

Formats (``fmt`` of :func:`data_shards.import_dataset`):

``unisrec``
    UniSRec / MISSRec "downstream" files in one directory, ``<D>`` = dataset name:
    ``<D>.item2index`` and ``<D>.user2index`` (``<original id>\\t<0-based index>``),
    ``<D>.{train,valid,test}.inter`` (header, then ``user\\thistory items\\ttarget``),
    ``<D>.text`` (header, then ``<original item id>\\t<text>``). The full sequence of a
    user is its test row (history + target); UniSRec caps histories at 50 items, so a
    longer sequence is rebuilt from the user's train rows. No timestamps.
``recbole``
    RecBole atomic files ``<D>.inter`` and optionally ``<D>.item``: tab-separated with a
    typed header (``user_id:token  item_id:token  rating:float  timestamp:float``).
``lcrec``
    LC-Rec / LETTER JSON: ``<D>.inter.json`` ``{"<user>": [item, ...]}`` (time-ordered)
    and ``<D>.item.json`` ``{"<item>": {"title", "description", "brand", "categories"}}``.
``amazon2018``
    Amazon Reviews 2018 raw files: a ratings CSV without header
    (``item,user,rating,timestamp``) and ``meta_<Category>.json.gz`` (one JSON object per
    line with ``asin``, ``title``, ``brand``, ``category`` (list), ``description``).
    Interactions with items that have no metadata are dropped (the paper's data prep).

Every reader reports a bad record through :class:`~data_shards.errors.BadRecords`
(which raises, or counts and skips in ``--skip-bad`` mode) with ``file:line`` and the
field at fault.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import html
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .errors import BadRecords, DataError
from .interactions import RawInteractions

__all__ = ["FORMATS", "item_text_from_fields", "read_amazon2018", "read_lcrec", "read_recbole", "read_unisrec"]

_WS = re.compile(r"\s+")


def _clean(value, sep: str = ", ") -> str:
    """A metadata field (str, list of str or nested lists, joined by ``sep``) as one clean line."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return sep.join(p for p in (_clean(v, sep) for v in value) if p)
    return _WS.sub(" ", html.unescape(str(value))).strip()


def item_text_from_fields(title=None, brand=None, categories=None, description=None, *extra) -> str:
    """Item text from its metadata: the non-empty fields joined as ``"title. brand. categories. description"``
    (list-valued categories joined by ", ", description paragraphs by " ")."""
    parts = [_clean(title), _clean(brand), _clean(categories), _clean(description, " "), *map(_clean, extra)]
    return ". ".join(p for p in (p.rstrip(". ") for p in parts) if p)


def _first_bad_utf8(path: Path) -> tuple[int, int, int] | None:
    """(line, column, byte) of the first byte of ``path`` that is not UTF-8 (gz-aware), or None."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line, col_start, offset = 1, 0, 0
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                head = chunk[:e.start]
                nl = head.rfind(b"\n")
                line += head.count(b"\n")
                col = e.start - nl if nl >= 0 else offset + e.start - col_start + 1
                return line, col, chunk[e.start]
            nl = chunk.rfind(b"\n")
            line += chunk.count(b"\n")
            if nl >= 0:
                col_start = offset + nl + 1
            offset += len(chunk)
    return None


@contextlib.contextmanager
def open_text(path: Path, **kwargs):
    """Open a UTF-8 text file (``.gz`` too); text that is not UTF-8 raises a
    :class:`DataError` naming the file, line and byte instead of a bare codec error."""
    path = Path(path)
    f = gzip.open(path, "rt", encoding="utf-8", **kwargs) if path.suffix == ".gz" else \
        open(path, encoding="utf-8", **kwargs)
    try:
        with f:
            yield f
    except UnicodeDecodeError:
        where = _first_bad_utf8(path)
        if where is None:
            raise
        line, col, byte = where
        raise DataError(f"{path}:{line}", f"not UTF-8 text (byte 0x{byte:02x} at column {col}); "
                                          f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(str(path), "missing file")
    return path


def _find_name(directory: Path, suffix: str, name: str | None) -> str:
    """The dataset name ``<D>`` of ``<D><suffix>`` in ``directory`` (must be unique if not given)."""
    if not directory.is_dir():
        raise DataError(str(directory), "missing directory")
    if name is not None:
        return name
    found = sorted(p.name[: -len(suffix)] for p in directory.glob(f"*{suffix}"))
    if len(found) != 1:
        raise DataError(str(directory), f"expected exactly one *{suffix} file to name the dataset, found "
                                        f"{found or 'none'}; pass name=")
    return found[0]


class _Coder:
    """Original ids -> dense codes in first-seen order."""

    def __init__(self, ids: Iterable[str] = ()):
        self.code: dict[str, int] = {}
        self.ids: list[str] = []
        for i in ids:
            self(i)

    def __call__(self, key: str) -> int:
        c = self.code.get(key)
        if c is None:
            c = self.code[key] = len(self.ids)
            self.ids.append(key)
        return c


# --------------------------------------------------------------------------- UniSRec

def _read_index(path: Path, bad: BadRecords) -> dict[int, str]:
    """``<original id>\\t<index>`` lines -> {index: original id}."""
    out: dict[int, str] = {}
    with open_text(_need(path)) as f:
        for ln, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
                bad(f"{path}:{ln}", f"malformed row {line.rstrip()!r}: expected '<id>\\t<integer index>'",
                    "malformed row")
                continue
            idx = int(parts[1])
            if idx in out:
                bad(f"{path}:{ln}", f"index {idx} given twice ({out[idx]!r} and {parts[0]!r})", "duplicate index")
                continue
            out[idx] = parts[0]
    return out


def _read_inter_rows(path: Path, users: dict, items: dict, bad: BadRecords) -> dict[int, list]:
    """UniSRec ``.inter`` -> {user index: [(history, target, line), ...]} in file order."""
    rows: dict[int, list] = {}
    with open_text(_need(path)) as f:
        header = f.readline().rstrip("\n").split("\t")
        if [h.split(":")[0] for h in header] != ["user_id", "item_id_list", "item_id"]:
            raise DataError(f"{path}:1", f"expected header 'user_id:token  item_id_list:token_seq  item_id:token', "
                                         f"got {header}")
        for ln, line in enumerate(f, 2):
            parts = line.rstrip("\n").split("\t")
            where = f"{path}:{ln}"
            try:
                if len(parts) != 3:
                    raise ValueError(f"expected 3 tab-separated fields, got {len(parts)}")
                user, hist, target = int(parts[0]), [int(x) for x in parts[1].split()], int(parts[2])
            except ValueError as e:
                bad(where, f"malformed row: {e}", "malformed row")
                continue
            if user not in users:
                bad(where, f"unknown user id {user} (not in user2index)", "unknown user id")
                continue
            unknown = [i for i in hist + [target] if i not in items]
            if unknown:
                bad(where, f"unknown item id {unknown[0]} (not in item2index)", "unknown item id")
                continue
            if not hist:
                bad(where, "empty history", "malformed row")
                continue
            rows.setdefault(user, []).append((hist, target, ln))
    return rows


def _unisrec_sequence(user: int, test_row, train_rows, valid_row, files: dict) -> list[int]:
    """The full sequence of ``user``: the test row, or rebuilt from the train rows when
    the test history was capped (more train rows than the test row accounts for)."""
    hist, target, _ = test_row
    seq = hist + [target]
    if not train_rows or len(train_rows) + 3 <= len(seq) or valid_row is None:
        return seq
    # Train rows come newest target first; their targets are positions 1..n-3.
    asc = train_rows[::-1]
    full = [asc[0][0][0]] + [t for _, t, _ in asc] + [valid_row[1], target]
    cap = max(len(h) for h, _, _ in train_rows + [test_row, valid_row])
    for name, (h, t, line), p in [("train", r, i + 1) for i, r in enumerate(asc)] + [
            ("valid", valid_row, len(full) - 2), ("test", test_row, len(full) - 1)]:
        if full[p] != t or h != full[max(0, p - cap):p]:
            raise DataError(f"{files[name]}:{line}", f"user {user}: row does not fit the sequence rebuilt from "
                                                     f"the train rows (history capped at {cap})")
    return full


def read_unisrec(path: str | Path, name: str | None = None, bad: BadRecords | None = None):
    """Read UniSRec downstream files in directory ``path`` (``<name>.*``).

    Returns ``(raw, item_index, name)``: ``item_index`` maps an original item id (ASIN)
    to its row in the dataset's own feature files (``<name>.feat*``).
    """
    bad = BadRecords() if bad is None else bad
    d = Path(path)
    name = _find_name(d, ".test.inter", name)
    items = _read_index(d / f"{name}.item2index", bad)
    users = _read_index(d / f"{name}.user2index", bad)
    files = {s: d / f"{name}.{s}.inter" for s in ("train", "valid", "test")}
    test = _read_inter_rows(files["test"], users, items, bad)
    train = _read_inter_rows(files["train"], users, items, bad) if files["train"].is_file() else {}
    valid = _read_inter_rows(files["valid"], users, items, bad) if files["valid"].is_file() else {}

    text: dict[str, str] = {}
    asins = set(items.values())
    text_path = d / f"{name}.text"
    if text_path.is_file():
        with open_text(text_path) as f:
            f.readline()  # header: item_id:token  text:token_seq
            for ln, line in enumerate(f, 2):
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2:
                    bad(f"{text_path}:{ln}", f"malformed row: expected '<item id>\\t<text>', got {len(parts)} "
                                             "fields", "malformed row")
                    continue
                if parts[0] not in asins:
                    bad(f"{text_path}:{ln}", f"unknown item id {parts[0]!r} (not in item2index)", "unknown item id")
                    continue
                text[parts[0]] = _WS.sub(" ", parts[1]).strip()

    item_order = sorted(items)
    item_code = {idx: c for c, idx in enumerate(item_order)}
    user_order = sorted(test)
    u_col, i_col = [], []
    for c, u in enumerate(user_order):
        if len(test[u]) != 1:
            bad(f"{files['test']}:{test[u][1][2]}", f"user {u} has {len(test[u])} test rows", "duplicate user")
            continue
        try:
            seq = _unisrec_sequence(u, test[u][0], train.get(u, []), (valid.get(u) or [None])[0], files)
        except DataError as e:
            bad(e.where, e.why, "inconsistent rows")
            continue
        u_col += [c] * len(seq)
        i_col += [item_code[i] for i in seq]
    item_ids = [items[i] for i in item_order]
    raw = RawInteractions(
        user=np.asarray(u_col, dtype=np.int64), item=np.asarray(i_col, dtype=np.int64), time=None,
        user_ids=[users[u] for u in user_order], item_ids=item_ids,
        item_text=[text.get(a, "") for a in item_ids], has_meta=np.ones(len(item_ids), dtype=bool),
    )
    return raw, {items[i]: i for i in item_order}, name


# --------------------------------------------------------------------------- RecBole

_TITLE = ("title", "movie_title", "name", "item_name")
_BRAND = ("brand",)
_CATEGORIES = ("categories", "category", "class", "genre", "genres")
_DESCRIPTION = ("description", "desc")


def _read_atomic(path: Path, bad: BadRecords):
    """A RecBole atomic file -> (field names, types, rows of (line, values))."""
    with open_text(_need(path)) as f:
        header = f.readline().rstrip("\n").split("\t")
        fields, types = [], []
        for h in header:
            if ":" not in h:
                raise DataError(f"{path}:1", f"header field {h!r} has no ':type' (expected e.g. 'item_id:token')")
            n, t = h.split(":", 1)
            if t not in ("token", "token_seq", "float", "float_seq"):
                raise DataError(f"{path}:1", f"header field {h!r}: unknown type {t!r}")
            fields.append(n)
            types.append(t)
        rows = []
        for ln, line in enumerate(f, 2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != len(fields):
                bad(f"{path}:{ln}", f"malformed row: expected {len(fields)} tab-separated fields, got {len(parts)}",
                    "malformed row")
                continue
            rows.append((ln, parts))
    return fields, types, rows


def read_recbole(path: str | Path, name: str | None = None, bad: BadRecords | None = None, *,
                 user_field: str = "user_id", item_field: str = "item_id", time_field: str = "timestamp"):
    """Read RecBole atomic files ``<name>.inter`` (+ ``<name>.item``) from directory ``path``.

    Timestamps come from ``time_field`` when the ``.inter`` file has it. Returns
    ``(raw, item_index, name)`` with ``item_index`` = row order of ``<name>.item``.
    """
    bad = BadRecords() if bad is None else bad
    d = Path(path)
    name = _find_name(d, ".inter", name)
    inter_path = d / f"{name}.inter"
    fields, _, rows = _read_atomic(inter_path, bad)
    for f_ in (user_field, item_field):
        if f_ not in fields:
            raise DataError(f"{inter_path}:1", f"no {f_!r} field in header {fields}")
    ui, ii = fields.index(user_field), fields.index(item_field)
    ti = fields.index(time_field) if time_field in fields else None

    item_path = d / f"{name}.item"
    catalogue: dict[str, str] | None = None
    items = _Coder()
    if item_path.is_file():
        ifields, itypes, irows = _read_atomic(item_path, bad)
        if item_field not in ifields:
            raise DataError(f"{item_path}:1", f"no {item_field!r} field in header {ifields}")
        key = ifields.index(item_field)
        pick = lambda aliases: next((j for j, f_ in enumerate(ifields) if f_ in aliases), None)
        known = [pick(a) for a in (_TITLE, _BRAND, _CATEGORIES, _DESCRIPTION)]
        rest = [j for j, t in enumerate(itypes) if j != key and j not in known and t.startswith("token")]
        catalogue = {}
        for _, parts in irows:
            catalogue[parts[key]] = item_text_from_fields(*[parts[j] if j is not None else None for j in known],
                                                          *[parts[j] for j in rest])
            items(parts[key])

    users = _Coder()
    u_col, i_col, t_col = [], [], []
    for ln, parts in rows:
        where = f"{inter_path}:{ln}"
        if catalogue is not None and parts[ii] not in catalogue:
            bad(where, f"unknown item id {parts[ii]!r} (not in {item_path.name})", "unknown item id")
            continue
        if ti is not None:
            try:
                t = float(parts[ti])
            except ValueError:
                bad(where, f"malformed row: field {time_field!r} = {parts[ti]!r} is not a number", "malformed row")
                continue
            t_col.append(t)
        u_col.append(users(parts[ui]))
        i_col.append(items(parts[ii]))
    raw = RawInteractions(
        user=np.asarray(u_col, dtype=np.int64), item=np.asarray(i_col, dtype=np.int64),
        time=np.asarray(t_col, dtype=np.float64) if ti is not None else None,
        user_ids=users.ids, item_ids=items.ids,
        item_text=[(catalogue or {}).get(i, "") for i in items.ids],
        has_meta=np.ones(len(items.ids), dtype=bool),
    )
    return raw, ({i: c for c, i in enumerate(items.ids)} if catalogue is not None else None), name


# --------------------------------------------------------------------------- LC-Rec

def _load_json(path: Path):
    try:
        with open_text(_need(path)) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}", f"not valid JSON: {e.msg} (column {e.colno})") from None


def read_lcrec(path: str | Path, name: str | None = None, bad: BadRecords | None = None):
    """Read LC-Rec ``<name>.inter.json`` + ``<name>.item.json`` from directory ``path``.

    Returns ``(raw, item_index, name)``; ``item_index`` maps the item key to its integer.
    """
    bad = BadRecords() if bad is None else bad
    d = Path(path)
    name = _find_name(d, ".inter.json", name)
    inter_path, item_path = d / f"{name}.inter.json", d / f"{name}.item.json"
    inter, meta = _load_json(inter_path), _load_json(item_path)
    for p, obj in ((inter_path, inter), (item_path, meta)):
        if not isinstance(obj, dict):
            raise DataError(str(p), f"expected a JSON object at top level, got {type(obj).__name__}")

    def as_int(k: str):
        return int(k) if k.lstrip("-").isdigit() else None

    item_keys = []
    for k, v in meta.items():
        if as_int(k) is None or not isinstance(v, dict):
            bad(f"{item_path}: item {k!r}", "malformed record: expected an integer key and an object value",
                "malformed row")
            continue
        item_keys.append(k)
    item_keys.sort(key=int)
    code = {int(k): c for c, k in enumerate(item_keys)}
    users = sorted((k for k in inter if as_int(k) is not None), key=int)
    for k in inter:
        if as_int(k) is None:
            bad(f"{inter_path}: user {k!r}", "malformed record: user key is not an integer", "malformed row")
    u_col, i_col = [], []
    kept_users: list = []
    for u in users:
        seq = inter[u]
        where = f"{inter_path}: user {u}"
        if not isinstance(seq, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in seq):
            bad(where, "malformed record: expected a list of integer item ids", "malformed row")
            continue
        unknown = [i for i in seq if i not in code]
        if unknown:
            bad(where, f"unknown item id {unknown[0]} (not in {item_path.name})", "unknown item id")
            continue
        u_col += [len(kept_users)] * len(seq)
        i_col += [code[i] for i in seq]
        kept_users.append(u)
    texts = [item_text_from_fields(meta[k].get("title"), meta[k].get("brand"), meta[k].get("categories"),
                                   meta[k].get("description")) for k in item_keys]
    raw = RawInteractions(
        user=np.asarray(u_col, dtype=np.int64), item=np.asarray(i_col, dtype=np.int64), time=None,
        user_ids=kept_users, item_ids=item_keys, item_text=texts, has_meta=np.ones(len(item_keys), dtype=bool),
    )
    return raw, {k: int(k) for k in item_keys}, name


# --------------------------------------------------------------------------- Amazon 2018



def read_amazon2018(path: str | Path, meta: str | Path | None = None, name: str | None = None,
                    bad: BadRecords | None = None):
    """Read an Amazon Reviews 2018 ratings CSV (``item,user,rating,timestamp``) and its
    ``meta_<Category>.json.gz`` (default: next to the CSV, ``meta_<name>.json.gz``).

    Returns ``(raw, None, name)``: items in first-seen order of the ratings file.
    """
    bad = BadRecords() if bad is None else bad
    ratings = _need(Path(path))
    name = name or ratings.name.split(".")[0]
    meta_path = Path(meta) if meta is not None else ratings.with_name(f"meta_{name}.json.gz")
    catalogue: dict[str, str] = {}
    try:
        with open_text(_need(meta_path)) as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{meta_path}:{ln}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    bad(where, f"malformed row: not valid JSON ({e.msg}, column {e.colno})", "malformed row")
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("asin"), str):
                    bad(where, "malformed row: no 'asin' string field", "malformed row")
                    continue
                catalogue[rec["asin"]] = item_text_from_fields(rec.get("title"), rec.get("brand"),
                                                               rec.get("category"), rec.get("description"))
    except (OSError, EOFError) as e:  # gzip errors
        raise DataError(str(meta_path), f"cannot read: {e}") from None

    users, items = _Coder(), _Coder()
    u_col, i_col, t_col = [], [], []
    with open_text(ratings, newline="") as f:
        for ln, row in enumerate(csv.reader(f), 1):
            where = f"{ratings}:{ln}"
            if len(row) != 4:
                bad(where, f"malformed row: expected 'item,user,rating,timestamp', got {len(row)} fields",
                    "malformed row")
                continue
            try:
                float(row[2])
                t = float(row[3])
            except ValueError:
                bad(where, f"malformed row: rating {row[2]!r} / timestamp {row[3]!r} is not a number",
                    "malformed row")
                continue
            i_col.append(items(row[0]))
            u_col.append(users(row[1]))
            t_col.append(t)
    raw = RawInteractions(
        user=np.asarray(u_col, dtype=np.int64), item=np.asarray(i_col, dtype=np.int64),
        time=np.asarray(t_col, dtype=np.float64), user_ids=users.ids, item_ids=items.ids,
        item_text=[catalogue.get(i, "") for i in items.ids],
        has_meta=np.array([i in catalogue for i in items.ids], dtype=bool),
    )
    return raw, None, name


FORMATS: dict[str, Callable] = {
    "unisrec": read_unisrec,
    "recbole": read_recbole,
    "lcrec": read_lcrec,
    "amazon2018": read_amazon2018,
}
