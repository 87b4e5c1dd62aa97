"""Unit tests for tasks.data.chatml: parsing, cleaning, quarantine reasons, dedupe, splitting, count reconciliation."""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from tasks.config import DataConfig
from tasks.data.chatml import (
    PrepResult,
    Quarantined,
    Record,
    SchemaError,
    clean_text,
    dedupe,
    header_report,
    instruction_key,
    prepare,
    quarantine_to_jsonl,
    read_rows,
    split_records,
    splits_to_jsonl,
    to_chatml,
)

BITEXT = Path("/work/shared/data/bitext_customer_support_sample.csv")
HEADER = ["flags", "instruction", "category", "intent", "response"]


def csv_bytes(rows: list[list[str]], header: list[str] = HEADER) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def assert_reconciles(res: PrepResult) -> None:
    assert res.rows_in == res.rows_kept + res.rows_quarantined + res.rows_sampled_out
    assert res.rows_kept == sum(len(v) for v in res.splits.values())
    assert res.rows_quarantined == len(res.quarantine) == sum(res.reasons.values())
    for stats in res.per_file.values():
        assert stats["rows_in"] == stats["kept"] + stats["quarantined"] + stats["sampled_out"]


def split_instructions(res: PrepResult) -> dict[str, set[str]]:
    return {name: {instruction_key(r["messages"][1]["content"]) for r in rows} for name, rows in res.splits.items()}


# ------------------------------------------------------------------------------------------------ real sample

@pytest.fixture(scope="module")
def bitext() -> PrepResult:
    if not BITEXT.exists():
        pytest.skip(f"{BITEXT} not present")
    return prepare([("raw/bitext.csv", BITEXT.read_bytes())], DataConfig())


def test_bitext_sample_all_rows_kept(bitext):
    assert (bitext.rows_in, bitext.rows_kept, bitext.rows_quarantined) == (566, 566, 0)
    assert bitext.reasons == {} and bitext.unknown_columns == {}
    assert_reconciles(bitext)


def test_bitext_sample_splits(bitext):
    assert all(bitext.splits[s] for s in ("train", "validation", "test"))
    intents = {r["intent"] for rows in bitext.splits.values() for r in rows}
    assert len(intents) == 23
    for name in ("validation", "test"):  # every intent has >= 3 instructions, so it is in every split
        assert {r["intent"] for r in bitext.splits[name]} == intents
    seen = split_instructions(bitext)
    assert not seen["train"] & seen["validation"]
    assert not seen["train"] & seen["test"]
    assert not seen["validation"] & seen["test"]


def test_bitext_sample_chatml_content(bitext):
    rows = [r for rows in bitext.splits.values() for r in rows]
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in rows)
    assert all(r["messages"][0]["content"] == DataConfig().system_prompt for r in rows)
    assert any("{{Order Number}}" in r["messages"][1]["content"] for r in rows)
    assert any("{{Order Number}}" in r["messages"][2]["content"] for r in rows)
    assert any("\n1. " in r["messages"][2]["content"] for r in rows)  # numbered lists keep their newlines
    lines = splits_to_jsonl(bitext.splits["train"]).decode("utf-8").splitlines()
    assert len(lines) == len(bitext.splits["train"]) and json.loads(lines[0])["messages"]


def test_bitext_sample_max_rows_reconciles():
    if not BITEXT.exists():
        pytest.skip(f"{BITEXT} not present")
    cfg = DataConfig(max_rows=100)
    res = prepare([("raw/bitext.csv", BITEXT.read_bytes())], cfg)
    assert res.rows_kept == 100 and res.rows_sampled_out == 466 and res.rows_quarantined == 0
    assert_reconciles(res)
    again = prepare([("raw/bitext.csv", BITEXT.read_bytes())], cfg)
    assert again.splits == res.splits


# ------------------------------------------------------------------------------------------------ broken CSV

GOOD_RESPONSE = "Sure, here is how:\n1. Log in\n2. Open {{Order Number}}\n3. Click cancel"
BROKEN_ROWS = [
    ["B", "cancel my order {{Order Number}}", "ORDER", "cancel_order", GOOD_RESPONSE],  # 1 kept
    ["B", "where is my parcel", "SHIPPING", "track_order", "   "],  # 2 empty response
    ["B", " \t  ", "ORDER", "cancel_order", "ok"],  # 3 whitespace-only instruction
    ["B", "cancel my order {{Order Number}}", "ORDER", "cancel_order", GOOD_RESPONSE],  # 4 duplicate of 1
    ["B", "x" * 51, "ORDER", "cancel_order", "ok"],  # 5 over-long instruction
    ["B", "too many", "ORDER", "cancel_order", "ok", "surplus"],  # 6 extra column
    ["B", "too few", "ORDER"],  # 7 short row
    ["B", "INVALID_UTF8", "ORDER", "cancel_order", "ok"],  # 8 invalid bytes patched in below
    ["B", "nul\x00byte", "ORDER", "cancel_order", "ok"],  # 9 NUL byte
    ["B", "<b>Where</b> is my refund?&nbsp;&amp; invoice", "REFUND", "track_refund",
     "<p>Here it is</p><br>Thanks &quot;you&quot;"],  # 10 HTML, cleaned and kept
    ["B", "track my refund", "REFUND", "track_refund", "It is on its way."],  # 11 kept
]
EXPECTED_QUARANTINE = [
    (2, "empty_field"), (3, "empty_field"), (4, "duplicate"), (5, "too_long"), (6, "extra_columns"),
    (7, "short_row"), (8, "undecodable"), (9, "undecodable"),
]


@pytest.fixture()
def broken() -> tuple[DataConfig, bytes]:
    data = csv_bytes(BROKEN_ROWS).replace(b"INVALID_UTF8", b"bad \xff\xfe bytes")
    return DataConfig(max_instruction_chars=50), data


def test_broken_csv_counts_and_reasons(broken):
    cfg, data = broken
    res = prepare([("raw/broken.csv", data)], cfg)
    assert (res.rows_in, res.rows_kept, res.rows_quarantined, res.rows_sampled_out) == (11, 3, 8, 0)
    assert [(q.row, q.reason) for q in res.quarantine] == EXPECTED_QUARANTINE
    assert all(q.source == "raw/broken.csv" for q in res.quarantine)
    assert res.reasons == {"duplicate": 1, "empty_field": 2, "extra_columns": 1, "short_row": 1, "too_long": 1,
                           "undecodable": 2}
    assert res.per_file == {"raw/broken.csv": {"rows_in": 11, "kept": 3, "quarantined": 8, "sampled_out": 0}}
    assert_reconciles(res)


def test_broken_csv_details_and_raw(broken):
    cfg, data = broken
    by_row = {q.row: q for q in prepare([("raw/broken.csv", data)], cfg).quarantine}
    assert by_row[4].detail == "duplicate of raw/broken.csv:1"
    assert "response" in by_row[2].detail and "instruction" in by_row[3].detail
    assert "51" in by_row[5].detail and "50" in by_row[5].detail
    assert by_row[6].raw["__extra__"] == ["surplus"]
    assert by_row[7].raw == {"flags": "B", "instruction": "too few", "category": "ORDER"}
    assert by_row[8].raw["instruction"] == "bad \\xff\\xfe bytes"  # bytes shown, output stays valid UTF-8
    assert by_row[9].raw["instruction"] == "nul\\x00byte"
    out = quarantine_to_jsonl(by_row.values()).decode("utf-8")  # strict decode: must be valid UTF-8
    assert [json.loads(line)["row"] for line in out.splitlines()] == [2, 3, 4, 5, 6, 7, 8, 9]


def test_broken_csv_html_row_cleaned_and_kept(broken):
    cfg, data = broken
    records, quarantined, rows_in = read_rows("raw/broken.csv", data, cfg)
    assert rows_in == 11 and len(quarantined) == 7  # the duplicate is only caught by dedupe
    html_row = next(r for r in records if r.row == 10)
    assert html_row.instruction == "Where is my refund? & invoice"
    assert html_row.response == 'Here it is\n\nThanks "you"'
    assert next(r for r in records if r.row == 1).response == GOOD_RESPONSE


# ------------------------------------------------------------------------------------------------ file level

def test_missing_column_raises_schema_error():
    data = csv_bytes([["B", "hi", "ORDER", "cancel_order"]], header=["flags", "instr", "category", "intent"])
    with pytest.raises(SchemaError) as exc:
        read_rows("raw/a.csv", data, DataConfig())
    assert "raw/a.csv" in str(exc.value) and "'response'" in str(exc.value) and "'instr'" in str(exc.value)
    with pytest.raises(SchemaError, match="raw/a.csv"):
        prepare([("raw/a.csv", data)], DataConfig())


def test_header_only_file_gives_zero_rows():
    assert read_rows("raw/h.csv", csv_bytes([]), DataConfig()) == ([], [], 0)
    res = prepare([("raw/h.csv", csv_bytes([]))], DataConfig())
    assert (res.rows_in, res.rows_kept, res.rows_quarantined) == (0, 0, 0)


def test_bom_crlf_file_parses():
    text = ("instruction,response,intent,category\r\n"
            '"cancel order {{Order Number}}","Steps:\r\n1. Log in\r\n2. Cancel",cancel_order,ORDER\r\n'
            "hello,hi,greet,MISC\r\n")
    records, quarantined, rows_in = read_rows("raw/bom.csv", b"\xef\xbb\xbf" + text.encode(), DataConfig())
    assert rows_in == 2 and quarantined == []
    assert records[0].instruction == "cancel order {{Order Number}}"
    assert records[0].response == "Steps:\n1. Log in\n2. Cancel"
    assert records[0].flags == "" and records[1].row == 2


def test_unknown_columns_reported_and_ignored():
    data = csv_bytes([["x", "hi", "MISC", "greet", "hello", "B"]],
                     header=["extra", "instruction", "category", "intent", "response", "flags"])
    assert header_report("raw/u.csv", data, DataConfig()) == {
        "columns": ["extra", "instruction", "category", "intent", "response", "flags"],
        "unknown": ["extra"], "missing": []}
    res = prepare([("raw/u.csv", data)], DataConfig())
    assert res.unknown_columns == {"raw/u.csv": ["extra"]} and res.rows_kept == 1


@pytest.mark.parametrize("data", [b"\x00\x01\x02\xff\xfe binary", b"\xff\xfei\x00n\x00s\x00", b""])
def test_not_text_or_empty_file_raises(data):
    with pytest.raises(SchemaError, match="raw/bin.csv"):
        read_rows("raw/bin.csv", data, DataConfig())


def test_binary_jsonl_raises():
    with pytest.raises(SchemaError, match="raw/bin.jsonl: not UTF-8"):
        read_rows("raw/bin.jsonl", b"\xff\xfe\x00\x00\n\x89PNG\x00", DataConfig())


def test_unsupported_extension_raises():
    with pytest.raises(SchemaError, match=r"raw/a\.parquet: unsupported file type"):
        prepare([("raw/a.parquet", b"PAR1")], DataConfig())


# ------------------------------------------------------------------------------------------------ JSONL

def jline(**kw) -> bytes:
    base = {"instruction": "hi", "response": "hello", "intent": "greet", "category": "MISC", "flags": "B"}
    return json.dumps({**base, **kw}).encode()


def test_jsonl_good_and_malformed_lines():
    lines = [
        jline(instruction="first"),  # 1 kept
        b"{not json",  # 2 malformed
        b"",  # 3 blank: not a row
        b"[1, 2]",  # 4 a JSON array, not an object
        jline(instruction="second") + b"\r",  # 5 kept (CRLF)
        b'{"instruction": "x", "response": "y", "intent": "z"}',  # 6 no category
        b"\xff" + jline(instruction="third"),  # 7 invalid UTF-8
        b'{"instruction": "nul \\u0000 escape", "response": "r", "intent": "i", "category": "c"}',  # 8 NUL escape
        jline(instruction={"nested": 1}),  # 9 not a string
        jline(instruction="fourth", intent=7),  # 10 numbers are accepted as text
    ]
    records, quarantined, rows_in = read_rows("raw/c.jsonl", b"\n".join(lines) + b"\n", DataConfig())
    assert rows_in == 9
    assert [(r.row, r.instruction) for r in records] == [(1, "first"), (5, "second"), (10, "fourth")]
    assert records[2].intent == "7"
    assert [(q.row, q.reason) for q in quarantined] == [
        (2, "malformed_json"), (4, "malformed_json"), (6, "missing_field"), (7, "undecodable"),
        (8, "undecodable"), (9, "malformed_json")]
    assert quarantined[0].raw == "{not json"
    assert "category" in quarantined[2].detail
    quarantine_to_jsonl(quarantined).decode("utf-8")


def test_jsonl_key_missing_everywhere_is_schema_error():
    data = b'{"instruction": "a", "answer": "b", "intent": "c", "category": "d"}\n'
    with pytest.raises(SchemaError, match=r"raw/d\.jsonl: missing required columns \['response'\]"):
        read_rows("raw/d.jsonl", data, DataConfig())


def test_jsonl_null_field_is_missing():
    records, quarantined, _ = read_rows("raw/e.jsonl", jline() + b"\n" + jline(response=None), DataConfig())
    assert len(records) == 1 and [(q.row, q.reason) for q in quarantined] == [(2, "missing_field")]


# ------------------------------------------------------------------------------------------------ clean_text

@pytest.mark.parametrize(("raw", "clean"), [
    ("<b>hi</b>", "hi"),
    ("line one<br>line two<BR/>three", "line one\nline two\nthree"),
    ('<a href="https://x.y/?a=1&amp;b=2">link</a> <span class="c">text</span>', "link text"),
    ("<script>alert('x')</script>safe<style>p {color: red}</style>", "safe"),
    ("Tom &amp; Jerry &lt;3 &#39;q&#39; &eacute;", "Tom & Jerry <3 'q' é"),
    ("terms&notice AT&T R&D", "terms&notice AT&T R&D"),  # bare '&word' is not an entity
    ("&lt;b&gt;literal&lt;/b&gt;", "<b>literal</b>"),  # escaped markup is content, not a tag
    ("<|user|> hello </s> <s>", "<|user|> hello </s> <s>"),
    ("use the <Order> tab if a < b and c > d", "use the <Order> tab if a < b and c > d"),
    ("order {{Order Number}} for {{Customer Name}}", "order {{Order Number}} for {{Customer Name}}"),
    ("Steps:\n1. Log in\n2. Go to  \"Orders\"\n3. Cancel", 'Steps:\n1. Log in\n2. Go to "Orders"\n3. Cancel'),
    ("  a \t\u00a0 b  \n\n\n\n  c\r\nd  ", "a b\n\nc\nd"),
    ("bell\x07 esc\x1b[0m zero\u200bwidth", "bell esc[0m zero\u200bwidth"),
    ("Cafe\u0301 😀 👨\u200d👩\u200d👧 ¡Hola! ¿Qué?", "Café 😀 👨\u200d👩\u200d👧 ¡Hola! ¿Qué?"),
    ("<p>first</p><p>second</p>", "first\n\nsecond"),
    ("<ul><li>one</li><li>two</li></ul>", "one\ntwo"),
    ("<ul>\n  <li>one</li>\n  <li>two</li>\n</ul>after", "one\ntwo\nafter"),
    ("text<div>block</div>more<br><br>end", "text\nblock\nmore\n\nend"),
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_clean_text_nfc_and_idempotent():
    s = clean_text("A\u030angstr\u00f6m <i>x</i>")
    assert s == "\u00c5ngstr\u00f6m x"
    assert clean_text(s) == s


# ------------------------------------------------------------------------------------------------ dedupe / chatml

def rec(instruction: str, intent: str = "a", response: str = "r", row: int = 1, source: str = "s.csv") -> Record:
    return Record(instruction, response, intent, "CAT", "", source, row)


def test_dedupe_needs_instruction_response_and_intent():
    records = [rec("x", row=1), rec("x", row=2), rec("x", intent="b", row=3), rec("x", response="other", row=4),
               rec("X", row=5)]
    kept, dupes = dedupe(records)
    assert [r.row for r in kept] == [1, 3, 4, 5]
    assert dupes == [Quarantined("s.csv", 2, "duplicate", "duplicate of s.csv:1",
                                 {"instruction": "x", "response": "r", "intent": "a", "category": "CAT",
                                  "flags": ""})]


def test_dedupe_across_files_keeps_first_file_in_name_order():
    a = csv_bytes([["B", "hi", "MISC", "greet", "hello"]])
    res = prepare([("raw/b.csv", a), ("raw/a.csv", a)], DataConfig())
    assert [(q.source, q.detail) for q in res.quarantine] == [("raw/b.csv", "duplicate of raw/a.csv:1")]
    assert res.per_file["raw/a.csv"]["kept"] == 1 and res.per_file["raw/b.csv"]["quarantined"] == 1
    assert_reconciles(res)


def test_to_chatml_shape():
    r = Record("q", "a", "intent", "cat", "BL", "raw/x.csv", 7)
    assert to_chatml(r, "sys") == {
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                     {"role": "assistant", "content": "a"}],
        "intent": "intent", "category": "cat", "flags": "BL", "source": "raw/x.csv", "row": 7}


# ------------------------------------------------------------------------------------------------ splitting

def synthetic(n_intents: int = 4, per_intent: int = 20) -> list[Record]:
    records, row = [], 0
    for i in range(n_intents):
        for j in range(per_intent):
            for variant in (f"question {j} about {i}", f"Question  {j} ABOUT {i}"):  # same instruction key
                row += 1
                records.append(rec(variant, intent=f"intent{i}", response=f"answer {row}", row=row))
    return records


def keys(records: list[Record]) -> set[str]:
    return {instruction_key(r.instruction) for r in records}


def test_split_groups_instructions_and_stratifies():
    splits = split_records(synthetic(), DataConfig())
    assert not keys(splits["train"]) & keys(splits["validation"])
    assert not keys(splits["train"]) & keys(splits["test"])
    assert not keys(splits["validation"]) & keys(splits["test"])
    for name, per_intent in (("train", 16), ("validation", 2), ("test", 2)):
        assert Counter(r.intent for r in splits[name]) == {f"intent{i}": per_intent * 2 for i in range(4)}


def test_split_is_independent_of_input_order():
    records = synthetic()
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    assert split_records(records, DataConfig()) == split_records(shuffled, DataConfig())
    assert split_records(records, DataConfig(seed=7)) != split_records(records, DataConfig())


def test_split_small_intents():
    records = [rec(f"q{i}", intent="three", row=i) for i in range(3)] + \
              [rec(f"p{i}", intent="two", row=10 + i) for i in range(2)]
    splits = split_records(records, DataConfig())
    assert Counter(r.intent for r in splits["test"]) == {"three": 1}
    assert Counter(r.intent for r in splits["validation"]) == {"three": 1}
    assert Counter(r.intent for r in splits["train"]) == {"three": 1, "two": 2}
    no_holdout = split_records(records, DataConfig(test_fraction=0.0, validation_fraction=0.0))
    assert len(no_holdout["train"]) == 5 and not no_holdout["test"] and not no_holdout["validation"]


def test_instruction_under_two_intents_stays_in_one_split():
    records = synthetic() + [rec(f"question {j} about 0", intent="intent1", row=1000 + j) for j in range(20)]
    splits = split_records(records, DataConfig())
    where = {name: keys(rs) for name, rs in splits.items()}
    assert not where["train"] & where["validation"] and not where["train"] & where["test"]
    assert not where["validation"] & where["test"]


def test_max_rows_sampling_is_proportional_seeded_and_reconciles():
    records = synthetic(n_intents=3, per_intent=10)  # 60 records, 20 per intent
    records += [rec(f"extra {j}", intent="intent0", row=500 + j) for j in range(20)]  # intent0 now has 40
    cfg = DataConfig(max_rows=20)
    splits = split_records(records, cfg)
    sampled = [r for rs in splits.values() for r in rs]
    assert len(sampled) == 20
    assert Counter(r.intent for r in sampled) == {"intent0": 10, "intent1": 5, "intent2": 5}
    shuffled = records[::-1]
    assert split_records(shuffled, cfg) == splits

    data = csv_bytes([["B", r.instruction, "CAT", r.intent, r.response] for r in records])
    res = prepare([("raw/big.csv", data)], cfg)
    assert (res.rows_in, res.rows_kept, res.rows_quarantined, res.rows_sampled_out) == (80, 20, 0, 60)
    assert res.per_file["raw/big.csv"]["sampled_out"] == 60
    assert_reconciles(res)
