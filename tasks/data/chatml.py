"""Raw support conversations (CSV / JSONL bytes) -> cleaned, deduplicated, split ChatML records.

Pure logic: no S3, no database, stdlib only. The prepare_chatml step reads the raw files, calls ``prepare`` and
writes the splits and the quarantine. Every input row ends up in exactly one place -- a split, the quarantine
(with a reason code from ``REASONS``) or the ``max_rows`` sample-out -- so the counts always reconcile:
``rows_in == rows_kept + rows_quarantined + rows_sampled_out``.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import random
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from tasks.config import DataConfig

REASONS = ("missing_field", "empty_field", "undecodable", "too_long", "extra_columns", "short_row",
           "malformed_json", "duplicate", "control_token", "header_row")
SPLITS = ("train", "validation", "test")
RAW_FIELD_LIMIT = 2000
UTF8_BOM = b"\xef\xbb\xbf"


class SchemaError(ValueError):
    """A whole file is unusable (missing columns, not text, unsupported type); the message names the file."""


@dataclass
class Quarantined:
    source: str
    row: int | None  # 1-based data row (CSV, header excluded) or physical line number (JSONL)
    reason: str
    detail: str
    raw: dict | str


@dataclass
class Record:
    instruction: str
    response: str
    intent: str
    category: str
    flags: str
    source: str
    row: int


@dataclass
class PrepResult:
    splits: dict[str, list[dict]]
    quarantine: list[Quarantined]
    rows_in: int
    rows_kept: int
    rows_quarantined: int
    reasons: dict[str, int]
    per_file: dict[str, dict]
    unknown_columns: dict[str, list[str]]
    rows_sampled_out: int = 0


# --------------------------------------------------------------------------------------------------- cleaning

# Only real HTML tag names are stripped: customer text such as "a < b", "use the <Order> tab", chat-template
# tokens like "<|user|>" or "</s>" must survive verbatim (the model side escapes those later).
_INLINE_TAGS = "b|i|u|em|strong|span|a|img|font"
_BLOCK_TAGS = "p|div|ul|ol|li|table|tr|h[1-6]"
_CELL_TAGS = "td|th"
_ATTRS = r"(?:[\s/][^<>]*)?>"  # unambiguous on purpose: nested optional whitespace backtracks catastrophically
_HIDDEN_OPEN_RE = re.compile(r"<!--|<(script|style)\b[^<>]*>", re.IGNORECASE)
_HIDDEN_CLOSE_RE = {"comment": re.compile("-->"), "script": re.compile(r"</script\s*>", re.IGNORECASE),
                    "style": re.compile(r"</style\s*>", re.IGNORECASE)}
# A run of adjacent block tags ("</li>\n<li>") is one line break, or a blank line when it closes a paragraph.
_BLOCK_TAG = rf"</?(?:{_BLOCK_TAGS}){_ATTRS}"
_BLOCK_RUN_RE = re.compile(rf"{_BLOCK_TAG}(?:\s*{_BLOCK_TAG})*\s*", re.IGNORECASE)
_PARAGRAPH_RE = re.compile(r"</?p\b", re.IGNORECASE)
_BR_RE = re.compile(rf"<br{_ATTRS}", re.IGNORECASE)
_CELL_RE = re.compile(rf"</?(?:{_CELL_TAGS}){_ATTRS}", re.IGNORECASE)
# script/style leftovers (an unclosed <script>) are dropped as bare tags
_INLINE_RE = re.compile(rf"</?(?:{_INLINE_TAGS}|script|style){_ATTRS}", re.IGNORECASE)
# Only ';'-terminated entities: html.unescape alone would turn "terms&notice" into "terms¬ice".
_ENTITY_RE = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_LINE_BREAKS_RE = re.compile(r"\r\n?|[\u2028\u2029\x85]")
_HSPACE_RE = re.compile(r"[^\S\n]+")  # any whitespace except newline: tabs, NBSP, thin spaces ...
_CONTROL_RE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x84\x86-\x9f\ufeff]")
_MANY_NEWLINES_RE = re.compile(r"\n{3,}")


def _drop_hidden(s: str) -> str:
    """Remove comments and script/style blocks *with* their contents, in linear time.

    A lazy ``<script>.*?</script>`` regex is quadratic on text with many unclosed openers; here, once a kind has
    no closer after some opener, no later opener of that kind can have one either, so it is never searched again.
    Unclosed openers stay (a bare <script> tag is stripped later, a stray "<!--" is kept as text).
    """
    parts, pos, unclosed = [], 0, set()
    for m in _HIDDEN_OPEN_RE.finditer(s):
        kind = (m.group(1) or "comment").lower()
        if m.start() < pos or kind in unclosed:  # inside a block already dropped, or known to be unclosed
            continue
        end = _HIDDEN_CLOSE_RE[kind].search(s, m.end())
        if end is None:
            unclosed.add(kind)
            continue
        parts.append(s[pos:m.start()])
        pos = end.end()
    parts.append(s[pos:])
    return "".join(parts)


def clean_text(s: str) -> str:
    """Strip HTML markup and entities, normalise whitespace and Unicode; keep wording, case, emoji, {{slots}}."""
    s = _drop_hidden(s)
    s = _BLOCK_RUN_RE.sub(lambda m: "\n\n" if _PARAGRAPH_RE.search(m.group(0)) else "\n", s)
    s = _BR_RE.sub("\n", s)  # after the runs: each <br> is one deliberate line break
    s = _CELL_RE.sub(" ", s)
    s = _INLINE_RE.sub("", s)
    # Unescape after stripping, so an escaped "&lt;b&gt;" stays visible text instead of being removed as a tag.
    s = _ENTITY_RE.sub(lambda m: html.unescape(m.group(0)), s)
    s = _LINE_BREAKS_RE.sub("\n", s)
    s = _HSPACE_RE.sub(" ", s)
    s = _CONTROL_RE.sub("", s)
    s = "\n".join(line.strip() for line in s.split("\n"))
    s = _MANY_NEWLINES_RE.sub("\n\n", s)
    return unicodedata.normalize("NFC", s.strip())


# Chat-template control tokens (ChatML, Zephyr/TinyLlama, Llama 2/3, Mistral). clean_text keeps them as text, but a
# training row must not carry them: rendered through the chat template, "</s>" in an answer ends the turn early and
# "<|assistant|>" in a question forges a turn. Such rows are quarantined (reason control_token), never rewritten.
_CONTROL_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_.:-]{1,40}\|>|</?s>|\[/?INST\]|<</?SYS>>|<unk>|<pad>")


def control_tokens(text: str) -> list[str]:
    """The distinct chat-template control tokens in a text, in order of first appearance."""
    return list(dict.fromkeys(m.group(0) for m in _CONTROL_TOKEN_RE.finditer(text)))


# --------------------------------------------------------------------------------------------------- reading

_BAD_CHAR_RE = re.compile("[\x00\ud800-\udfff]")  # NUL, or a surrogate left by surrogateescape / a JSON escape


def _is_bad_text(s: str) -> bool:
    return bool(_BAD_CHAR_RE.search(s))


def _safe_text(s: str) -> str:
    """Truncate and make printable: undecodable bytes become '\\xNN' and NUL becomes '\\x00'.

    Keeps ``raw`` valid UTF-8 and storable in Postgres JSONB (which rejects NUL), while still showing the bytes.
    """
    s = s[:RAW_FIELD_LIMIT]
    s = s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if _is_bad_text(s) else s
    return s.replace("\x00", "\\x00")


def _safe_value(v):
    if v is None or isinstance(v, (bool, int, float)):
        return v
    if not isinstance(v, str):
        v = json.dumps(v, ensure_ascii=False)
    return _safe_text(v)


def _required(cfg: DataConfig) -> list[str]:
    return [cfg.instruction_column, cfg.response_column, cfg.intent_column, cfg.category_column]


def _known(cfg: DataConfig) -> list[str]:
    return _required(cfg) + [cfg.flags_column]


def _file_kind(name: str) -> str:
    lower = name.lower()
    for ext in (".csv", ".jsonl"):
        if lower.endswith(ext):
            return ext
    raise SchemaError(f"{name}: unsupported file type (expected .csv or .jsonl)")


def _not_text(name: str, data: bytes) -> SchemaError:
    hint = " (looks like UTF-16; re-save it as UTF-8)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    return SchemaError(f"{name}: not UTF-8 text{hint}")


_MAGIC = ((b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"), (b"%PDF-", "PDF"), (b"\x89PNG", "PNG"), (b"PAR1", "Parquet"),
          (b"\xff\xd8\xff", "JPEG"), (b"SQLite format 3\x00", "SQLite"), (b"\xfd7zXZ\x00", "xz"),
          (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x7fELF", "ELF executable"))
_BINARY_SAMPLE = 8192
_BINARY_RATIO = 0.10
_BINARY_CHAR_RE = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\ud800-\udfff]")


def _check_text(name: str, data: bytes) -> None:
    """Refuse a file that is binary rather than text with a bad row or two: known magic numbers, UTF-16, or more
    than 10% control / undecodable characters in its first 8 KB. The message names the file and what it looks like."""
    head = data[:_BINARY_SAMPLE]
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise _not_text(name, data)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            raise SchemaError(f"{name}: not UTF-8 text (a {kind} file; {kind} data cannot be read as CSV/JSONL)")
    text = head.decode("utf-8", "surrogateescape")
    if len(head) == _BINARY_SAMPLE:  # do not count a character cut in half by the sample
        text = text[:-3]
    bad = len(_BINARY_CHAR_RE.findall(text))
    if text and bad / len(text) > _BINARY_RATIO:
        utf16 = " (looks like UTF-16 without a byte-order mark)" if head[1::2].count(0) > len(head) // 4 else ""
        raise SchemaError(f"{name}: not UTF-8 text ({bad} of the first {len(text)} characters are control bytes or "
                          f"invalid UTF-8: binary data){utf16}")


def _check_columns(name: str, columns: list[str], cfg: DataConfig) -> dict:
    missing = [c for c in _required(cfg) if c not in columns]
    unknown = [c for c in columns if c not in _known(cfg)]
    if missing:
        raise SchemaError(f"{name}: missing required columns {missing} (found: {columns})")
    return {"columns": columns, "unknown": unknown, "missing": missing}


def _make_record(values: dict, name: str, row: int, cfg: DataConfig) -> tuple[Record | None, tuple | None]:
    """Clean the fields of one row; return (record, None) or (None, (reason, detail))."""
    for col in _required(cfg):
        if values.get(col) is None:
            return None, ("missing_field", f"field '{col}' is missing")
    cleaned = {col: clean_text(values[col]) for col in _required(cfg)}
    empty = [col for col in _required(cfg) if not cleaned[col]]
    if empty:
        return None, ("empty_field", f"field(s) {empty} empty after cleaning")
    too_long = [(col, len(cleaned[col]), limit) for col, limit in (
        (cfg.instruction_column, cfg.max_instruction_chars), (cfg.response_column, cfg.max_response_chars))
        if len(cleaned[col]) > limit]
    if too_long:
        return None, ("too_long", "; ".join(f"'{c}' has {n} chars (limit {lim})" for c, n, lim in too_long))
    tokens = {col: found for col in (cfg.instruction_column, cfg.response_column)
              if (found := control_tokens(cleaned[col]))}
    if tokens:
        return None, ("control_token", "; ".join(f"'{c}' contains chat-template token(s) {found}"
                                                 for c, found in tokens.items()))
    flags = values.get(cfg.flags_column)
    return Record(instruction=cleaned[cfg.instruction_column], response=cleaned[cfg.response_column],
                  intent=cleaned[cfg.intent_column], category=cleaned[cfg.category_column],
                  flags=clean_text(flags) if isinstance(flags, str) else "", source=name, row=row), None


# CSV -----------------------------------------------------------------------------------------------------------

def _csv_records(name: str, data: bytes) -> Iterable[tuple[list[str], int, int]]:
    """(cells, first line, last line) per CSV record; lines are physical, 1-based, header included.

    A quote that is opened and never closed swallows the rest of the file into one field. Python's csv module
    (non-strict) says nothing, so the last record is checked again in strict mode: if it ends inside quotes the
    file fails with the line where the quote was opened, instead of hiding every later row in one cell.
    """
    # surrogateescape decodes byte by byte: one bad byte marks its own row, not the whole file.
    text = data.removeprefix(UTF8_BOM).decode("utf-8", "surrogateescape")
    # A legitimately huge field must become a too_long row, not a csv.Error that kills the file.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    buf = io.StringIO(text, newline="")
    reader = csv.reader(buf)
    start, first_line, last = 0, 1, None
    try:
        for cells in reader:
            last = (start, first_line)
            yield cells, first_line, reader.line_num
            start, first_line = buf.tell(), reader.line_num + 1
    except csv.Error as exc:
        raise SchemaError(f"{name}: CSV parse error near line {reader.line_num}: {exc}") from exc
    if last is not None:  # did the file end inside a quoted field of its last record?
        _check_closed_quotes(name, text[last[0]:], last[1], reader.line_num)


def _check_closed_quotes(name: str, tail: str, first_line: int, last_line: int) -> None:
    try:
        for _ in csv.reader(io.StringIO(tail, newline=""), strict=True):
            pass
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise SchemaError(f"{name}: unterminated quoted field: a quote opened in the record starting at line "
                              f"{first_line} is never closed, so lines {first_line}-{last_line} would be read as "
                              f"one row; fix the quoting") from exc


def _csv_rows(name: str, data: bytes) -> Iterable[list[str]]:
    for cells, _, _ in _csv_records(name, data):
        yield cells


def _csv_header(name: str, header: list[str] | None, data: bytes, cfg: DataConfig) -> dict:
    if header is None:
        raise SchemaError(f"{name}: empty file, no header row")
    if any(_is_bad_text(h) for h in header):
        raise _not_text(name, data)
    columns = [h.strip() for h in header]
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise SchemaError(f"{name}: duplicate header columns {dupes}")
    return _check_columns(name, columns, cfg)


def _csv_raw(columns: list[str], cells: list[str]) -> dict:
    raw = {col: _safe_text(val) for col, val in zip(columns, cells, strict=False)}
    if len(cells) > len(columns):
        raw["__extra__"] = [_safe_text(v) for v in cells[len(columns):]]
    return raw


def _csv_problem(columns: list[str], cells: list[str], lines: tuple[int, int]) -> tuple[str, str] | None:
    """Structural row problems, checked before the fields are looked at."""
    span = f" (lines {lines[0]}-{lines[1]})" if lines[1] > lines[0] else f" (line {lines[0]})"
    if any(_is_bad_text(c) for c in cells):
        return "undecodable", f"row contains bytes that are not valid UTF-8 or a NUL byte{span}"
    if len(cells) > len(columns):
        return "extra_columns", f"row has {len(cells)} fields, header has {len(columns)}{span}"
    if len(cells) < len(columns):
        return "short_row", f"row has {len(cells)} fields, header has {len(columns)}{span}"
    if [c.replace("\ufeff", "").strip().casefold() for c in cells] == [c.casefold() for c in columns]:
        return "header_row", f"row repeats the header (concatenated files?){span}"
    return None


def _read_csv(name: str, data: bytes, cfg: DataConfig) -> tuple[list[Record], list[Quarantined], int, dict]:
    _check_text(name, data)
    rows = iter(_csv_records(name, data))
    header = next(rows, None)
    report = _csv_header(name, header and header[0], data, cfg)
    columns = report["columns"]
    records, quarantine, rows_in = [], [], 0
    for cells, first, last in rows:
        if not cells:  # a blank line is not a data row (csv.DictReader skips it too)
            continue
        rows_in += 1
        problem = _csv_problem(columns, cells, (first, last))
        record = None
        if problem is None:
            record, problem = _make_record(dict(zip(columns, cells, strict=True)), name, rows_in, cfg)
        if record is not None:
            records.append(record)
        else:
            quarantine.append(Quarantined(name, rows_in, problem[0], problem[1], _csv_raw(columns, cells)))
    return records, quarantine, rows_in, report


# JSONL ---------------------------------------------------------------------------------------------------------

def _jsonl_lines(data: bytes) -> Iterable[tuple[int, bytes]]:
    """(1-based line number, line bytes) for every non-blank line."""
    for number, line in enumerate(data.removeprefix(UTF8_BOM).split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if line.strip():
            yield number, line


def _parse_jsonl_line(line: bytes) -> tuple[dict | None, tuple | None, dict | str]:
    """Return (object, None, raw) or (None, (reason, detail), raw)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, ("undecodable", f"line is not valid UTF-8: {exc.reason}"), \
            _safe_text(line.decode("utf-8", "surrogateescape"))
    if "\x00" in text:
        return None, ("undecodable", "line contains a NUL byte"), _safe_text(text)
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return None, ("malformed_json", f"invalid JSON: {exc.msg} at column {exc.colno}"), _safe_text(text)
    except ValueError as exc:  # NaN / Infinity, which JSON does not have
        return None, ("malformed_json", f"invalid JSON: {exc}"), _safe_text(text)
    except RecursionError:
        return None, ("malformed_json", "invalid JSON: nested too deeply"), _safe_text(text)
    if not isinstance(obj, dict):
        return None, ("malformed_json", f"expected a JSON object, got {type(obj).__name__}"), _safe_text(text)
    return obj, None, {str(k): _safe_value(v) for k, v in obj.items()}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _jsonl_values(obj: dict, cfg: DataConfig) -> tuple[dict | None, tuple | None]:
    """Field values as strings; numbers are accepted, nested values and odd characters are not."""
    values = {}
    for col in _known(cfg):
        v = obj.get(col)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if v is not None and not isinstance(v, str):
            return None, ("malformed_json", f"field '{col}' is a {type(v).__name__}, expected a string")
        if isinstance(v, str) and _is_bad_text(v):  # "\u0000" or a lone "\udc80" escape inside the JSON
            return None, ("undecodable", f"field '{col}' contains a NUL or lone surrogate character")
        values[col] = v
    return values, None


def _parse_jsonl(data: bytes) -> list[tuple[int, dict | None, tuple | None, dict | str]]:
    return [(number, *_parse_jsonl_line(line)) for number, line in _jsonl_lines(data)]


def _jsonl_header(name: str, data: bytes, parsed: list, cfg: DataConfig) -> dict:
    """JSONL has no header: its columns are the union of keys. A required key absent from *every* object is a
    schema problem (e.g. 'answer' instead of 'response'), not thousands of missing_field rows."""
    if parsed and all(problem and problem[0] == "undecodable" for _, _, problem, _ in parsed):
        raise _not_text(name, data)
    objects = [obj for _, obj, _, _ in parsed if obj is not None]
    if not objects:
        return {"columns": [], "unknown": [], "missing": []}
    columns = list(dict.fromkeys(str(k) for obj in objects for k in obj))
    return _check_columns(name, columns, cfg)


def _read_jsonl(name: str, data: bytes, cfg: DataConfig) -> tuple[list[Record], list[Quarantined], int, dict]:
    _check_text(name, data)
    parsed = _parse_jsonl(data)
    report = _jsonl_header(name, data, parsed, cfg)
    records, quarantine = [], []
    for number, obj, problem, raw in parsed:
        record = None
        if obj is not None:
            values, problem = _jsonl_values(obj, cfg)
            if values is not None:
                record, problem = _make_record(values, name, number, cfg)
        if record is not None:
            records.append(record)
        else:
            quarantine.append(Quarantined(name, number, problem[0], problem[1], raw))
    return records, quarantine, len(parsed), report


def _read(name: str, data: bytes, cfg: DataConfig) -> tuple[list[Record], list[Quarantined], int, dict]:
    reader = _read_csv if _file_kind(name) == ".csv" else _read_jsonl
    return reader(name, data, cfg)


def read_rows(name: str, data: bytes, cfg: DataConfig) -> tuple[list[Record], list[Quarantined], int]:
    """Parse and clean one raw file: (records, quarantined rows, rows_in). Raises SchemaError for a bad file."""
    records, quarantine, rows_in, _ = _read(name, data, cfg)
    return records, quarantine, rows_in


def header_report(name: str, data: bytes, cfg: DataConfig) -> dict:
    """{"columns", "unknown", "missing"} of one file. Raises SchemaError when required columns are missing."""
    _check_text(name, data)
    if _file_kind(name) == ".csv":
        return _csv_header(name, next(iter(_csv_rows(name, data)), None), data, cfg)
    return _jsonl_header(name, data, _parse_jsonl(data), cfg)


# --------------------------------------------------------------------------------------------------- dedupe

def _record_raw(r: Record) -> dict:
    return {k: _safe_text(getattr(r, k)) for k in ("instruction", "response", "intent", "category", "flags")}


def dedupe(records: list[Record]) -> tuple[list[Record], list[Quarantined]]:
    """Keep the first of each (instruction, response, intent); later copies go to quarantine as 'duplicate'."""
    first: dict[tuple, Record] = {}
    kept, dupes = [], []
    for r in records:
        key = (r.instruction, r.response, r.intent)
        if key in first:
            orig = first[key]
            dupes.append(Quarantined(r.source, r.row, "duplicate", f"duplicate of {orig.source}:{orig.row}",
                                     _record_raw(r)))
        else:
            first[key] = r
            kept.append(r)
    return kept, dupes


# --------------------------------------------------------------------------------------------------- ChatML

def to_chatml(record: Record, system_prompt: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": record.instruction},
            {"role": "assistant", "content": record.response},
        ],
        "intent": record.intent,
        "category": record.category,
        "flags": record.flags,
        "source": record.source,
        "row": record.row,
    }


# --------------------------------------------------------------------------------------------------- sampling

def _order_key(r: Record) -> tuple:
    # A total order on records, so seeded shuffles do not depend on the order the input arrived in.
    return (r.source, r.row, r.intent, r.instruction, r.response, r.category, r.flags)


def _quotas(counts: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over intents proportionally to ``counts`` (largest remainder, ties by intent name)."""
    n = sum(counts.values())
    exact = {k: total * c / n for k, c in counts.items()}
    quota = {k: int(v) for k, v in exact.items()}
    leftover = total - sum(quota.values())
    for k in sorted(counts, key=lambda k: (-(exact[k] - quota[k]), k))[:leftover]:
        quota[k] += 1
    return quota


def sample_records(records: list[Record], cfg: DataConfig) -> list[Record]:
    """At most cfg.max_rows records (0 = all), sampled per intent in proportion to its size, seeded."""
    if cfg.max_rows <= 0 or len(records) <= cfg.max_rows:
        return sorted(records, key=_order_key)
    by_intent: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_intent[r.intent].append(r)
    quota = _quotas({k: len(v) for k, v in by_intent.items()}, cfg.max_rows)
    sampled = []
    for intent in sorted(by_intent):
        pool = sorted(by_intent[intent], key=_order_key)
        rng = random.Random(f"{cfg.seed}:{intent}:sample")  # noqa: S311 -- reproducible sampling, not crypto
        sampled += rng.sample(pool, quota[intent])
    return sorted(sampled, key=_order_key)


# --------------------------------------------------------------------------------------------------- splitting

def instruction_key(text: str) -> str:
    """Grouping key: two instructions that differ only in case or spacing are the same instruction."""
    return " ".join(text.casefold().split())


def _split_sizes(n: int, cfg: DataConfig) -> tuple[int, int]:
    """(test, validation) counts for an intent with n distinct instructions; train always keeps at least one."""
    n_test, n_val = round(n * cfg.test_fraction), round(n * cfg.validation_fraction)
    if n >= 3:
        n_test = max(n_test, 1) if cfg.test_fraction > 0 else 0
        n_val = max(n_val, 1) if cfg.validation_fraction > 0 else 0
    n_test = min(n_test, max(n - 1, 0))
    n_val = min(n_val, max(n - 1 - n_test, 0))
    return n_test, n_val


def _group_intent(group: list[Record]) -> str:
    # An instruction seen under several intents is stratified under its most common one (ties: smallest name);
    # grouping globally, not per intent, is what keeps an instruction out of two splits.
    counts = Counter(r.intent for r in group)
    return min(counts, key=lambda k: (-counts[k], k))


def split_records(records: list[Record], cfg: DataConfig) -> dict[str, list[Record]]:
    """Stratified, instruction-grouped, seeded train/validation/test split (after max_rows sampling)."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in sample_records(records, cfg):
        groups[instruction_key(r.instruction)].append(r)
    keys_by_intent: dict[str, list[str]] = defaultdict(list)
    for key, group in groups.items():
        keys_by_intent[_group_intent(group)].append(key)
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for intent in sorted(keys_by_intent):
        keys = sorted(keys_by_intent[intent])
        random.Random(f"{cfg.seed}:{intent}").shuffle(keys)  # noqa: S311 -- reproducible split, not crypto
        n_test, n_val = _split_sizes(len(keys), cfg)
        for i, key in enumerate(keys):
            name = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
            splits[name].extend(groups[key])
    return {s: sorted(rs, key=_order_key) for s, rs in splits.items()}


# --------------------------------------------------------------------------------------------------- prepare

def prepare(files: list[tuple[str, bytes]], cfg: DataConfig) -> PrepResult:
    """Read, clean, dedupe, sample and split a set of raw files into ChatML splits plus a quarantine."""
    records: list[Record] = []
    quarantine: list[Quarantined] = []
    per_file: dict[str, dict] = {}
    unknown: dict[str, list[str]] = {}
    errors: list[str] = []
    for name, data in sorted(files, key=lambda f: f[0]):  # sorted: dedupe keeps the first copy
        try:
            recs, quar, rows_in, report = _read(name, data, cfg)
        except SchemaError as exc:  # read every file first, so one run names all the bad ones
            errors.append(str(exc))
            continue
        records += recs
        quarantine += quar
        per_file[name] = {"rows_in": rows_in, "kept": 0, "quarantined": len(quar), "sampled_out": 0}
        if report["unknown"]:
            unknown[name] = report["unknown"]
    if errors:
        raise SchemaError(errors[0] if len(errors) == 1 else
                          f"{len(errors)} of {len(files)} raw files are unusable:\n" + "\n".join(errors))
    records, dupes = dedupe(records)
    quarantine += dupes
    splits = split_records(records, cfg)
    kept = Counter(r.source for rs in splits.values() for r in rs)
    for d in dupes:
        per_file[d.source]["quarantined"] += 1
    for name, stats in per_file.items():
        stats["kept"] = kept[name]
        stats["sampled_out"] = stats["rows_in"] - stats["kept"] - stats["quarantined"]
    quarantine.sort(key=lambda q: (q.source, q.row or 0))
    rows_kept = sum(kept.values())
    return PrepResult(
        splits={s: [to_chatml(r, cfg.system_prompt) for r in rs] for s, rs in splits.items()},
        quarantine=quarantine,
        rows_in=sum(f["rows_in"] for f in per_file.values()),
        rows_kept=rows_kept,
        rows_quarantined=len(quarantine),
        reasons=dict(sorted(Counter(q.reason for q in quarantine).items())),
        per_file=per_file,
        unknown_columns=unknown,
        rows_sampled_out=len(records) - rows_kept,
    )


# --------------------------------------------------------------------------------------------------- output

def _jsonl(objs: Iterable[dict]) -> bytes:
    # backslashreplace: a stray surrogate can never make the file invalid UTF-8
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs).encode("utf-8", "backslashreplace")


def quarantine_to_jsonl(items: Iterable[Quarantined]) -> bytes:
    return _jsonl(dataclasses.asdict(q) for q in items)


def splits_to_jsonl(records: list[dict]) -> bytes:
    return _jsonl(records)


__all__ = ["REASONS", "SPLITS", "PrepResult", "Quarantined", "Record", "SchemaError", "clean_text", "dedupe",
           "header_report", "instruction_key", "prepare", "quarantine_to_jsonl", "read_rows", "sample_records",
           "split_records", "splits_to_jsonl", "to_chatml"]
