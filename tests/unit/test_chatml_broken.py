"""chatml on hostile input: control tokens, glued exports, unbalanced quotes, binary files, pathological JSON."""

from __future__ import annotations

import pytest

from tasks.config import DataConfig
from tasks.data.chatml import SchemaError, control_tokens, prepare, read_rows

HEAD = b"flags,instruction,category,intent,response\n"


def reasons(data: bytes, name: str = "raw/x.csv") -> tuple[int, dict[int, str]]:
    records, quarantined, _ = read_rows(name, data, DataConfig())
    return len(records), {q.row: q.reason for q in quarantined}


@pytest.mark.parametrize(("text", "found"), [
    ("<|user|> hi </s>", ["<|user|>", "</s>"]),
    ("<|im_start|>assistant<|im_end|>", ["<|im_start|>", "<|im_end|>"]),
    ("[INST] x [/INST] <<SYS>>", ["[INST]", "[/INST]", "<<SYS>>"]),
    ("a < b, the <Order> tab, | pipes |, s/old/new/, <3", []),
])
def test_control_tokens(text, found):
    assert control_tokens(text) == found


def test_control_token_rows_are_quarantined_even_when_escaped():
    data = HEAD + (b"B,hello there,C,greet,hi </s> bye\n"
                   b"B,&lt;|assistant|&gt; obey,C,greet,ok\n"
                   b"B,is 2 < 3 in the <Order> tab,C,greet,yes\n")
    kept, got = reasons(data)
    assert kept == 1 and got == {1: "control_token", 2: "control_token"}


def test_repeated_header_from_glued_exports():
    data = b"\xef\xbb\xbf" + HEAD + b"B,a,C,i,r\n" + b"\xef\xbb\xbf" + HEAD + b"B,b,C,i,r\n"
    assert reasons(data) == (2, {2: "header_row"})


def test_quotes_inside_unquoted_field_are_text_and_a_closed_stray_quote_is_confined():
    assert reasons(HEAD + b'B,my 5" screen broke,C,i,sorry\n') == (1, {})
    # A stray quote closed by a later one merges records; the result is quarantined with its line span.
    records, quarantined, rows_in = read_rows("raw/x.csv", HEAD + b'B,"oops,C,i,r\nB,b,C,i,"r"\nB,c,C,i,r\n',
                                              DataConfig())
    assert rows_in == 2 and [r.instruction for r in records] == ["c"]
    assert quarantined[0].reason == "short_row" and "(lines 2-3)" in quarantined[0].detail


def test_quote_never_closed_fails_the_file_with_the_line():
    with pytest.raises(SchemaError, match=r"raw/x\.csv: unterminated quoted field.*line 3.*lines 3-5"):
        read_rows("raw/x.csv", HEAD + b'B,a,C,i,r\nB,"b,C,i,r\nB,c,C,i,r\nB,d,C,i,r\n', DataConfig())


@pytest.mark.parametrize(("data", "phrase"), [
    (b"\x1f\x8b\x08\x00" + bytes(range(256)), "a gzip file"),
    (b"PK\x03\x04rest", "a zip file"),
    (bytes(range(256)) * 8, "binary data"),
    ("instruction,response,intent,category\nhi,yo,g,C\n".encode("utf-16-le"), "UTF-16 without a byte-order mark"),
])
def test_binary_files_are_refused_by_name(data, phrase):
    for name in ("raw/b.csv", "raw/b.jsonl"):
        with pytest.raises(SchemaError, match=rf"{name}: not UTF-8 text.*{phrase}"):
            read_rows(name, data, DataConfig())


def test_a_few_nul_bytes_do_not_make_a_text_file_binary():
    rows = b"".join(b"B,question %d about my order,C,i,an answer that is long enough\n" % i for i in range(40))
    assert reasons(HEAD + rows + b"B,nul\x00here,C,i,r\n") == (40, {41: "undecodable"})


def test_pathological_json_lines_are_rows_not_crashes():
    good = b'{"instruction": "hi", "response": "yo", "intent": "g", "category": "C"}'
    data = b"\n".join([good, b"[" * 50_000 + b"]" * 50_000, b'{"instruction": NaN, "response": "x"}',
                       b'{"instruction": "a", "response": Infinity, "intent": "g", "category": "C"}'])
    assert reasons(data, "raw/x.jsonl") == (1, {2: "malformed_json", 3: "malformed_json", 4: "malformed_json"})


def test_every_unusable_file_is_named_in_one_error():
    good = HEAD + b"B,a,C,i,r\n"
    with pytest.raises(SchemaError) as exc:
        prepare([("raw/ok.csv", good), ("raw/empty.csv", b""), ("raw/bad.csv", b"q,a\n1,2\n")], DataConfig())
    msg = str(exc.value)
    assert msg.startswith("2 of 3 raw files are unusable")
    assert "raw/empty.csv: empty file" in msg and "raw/bad.csv: missing required columns" in msg
    assert "raw/ok.csv" not in msg
