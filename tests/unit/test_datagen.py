"""Unit tests for tasks.demo.datagen (synthetic Bitext-schema support dataset). No network, no services."""

from __future__ import annotations

import copy
import csv
import fnmatch
import hashlib
import io
import random
import re
import time
import tomllib
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest
import yaml

from tasks.config import Config
from tasks.context import StepContext
from tasks.demo import datagen
from tasks.errors import StepError
from tasks.steps import generate_demo_data

BITEXT_SAMPLE = Path("/work/shared/data/bitext_customer_support_sample.csv")
HEADER = ["flags", "instruction", "category", "intent", "response"]
PLACEHOLDER_RE = re.compile(r"\{\{([^{}]*)\}\}")
CONTRACTION_RE = re.compile(r"\b\w+'(?:m|d|ve|ll|re|s|t)\b", re.IGNORECASE)
POLITE_PHRASES = ("could you", "could u", "would you")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return datagen.generate_rows(2400, seed=0)


@pytest.fixture(scope="module")
def examples() -> list[tuple[dict, str]]:
    return list(datagen.iter_examples(2400, seed=0))


def read_support_csv(fh) -> tuple[list[str], list[dict]]:
    """The reader the pipeline uses for the real Bitext data."""
    reader = csv.DictReader(fh)
    return list(reader.fieldnames or []), list(reader)


def strip_placeholders(text: str) -> str:
    return PLACEHOLDER_RE.sub("X", text)


def tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", PLACEHOLDER_RE.sub(" ", text).lower()))


def with_flag(rows: list[dict], letter: str, present: bool = True) -> list[dict]:
    picked = [r for r in rows if (letter in r["flags"]) == present]
    assert picked, f"no rows with flag {letter} present={present}"
    return picked


def count_sentences(text: str) -> int:
    text = re.sub(r"(?m)^\d+\.\s", "", text)  # numbered step markers are not sentence ends
    return len(re.findall(r"[.!?](?:\s|$)", text))


def test_header_and_columns_match_bitext(rows):
    assert list(datagen.FIELDNAMES) == HEADER
    assert datagen.to_csv_bytes(rows).split(b"\n", 1)[0] == ",".join(HEADER).encode()
    assert all(list(r) == HEADER for r in rows)
    assert all(all(isinstance(v, str) and v for v in r.values()) for r in rows)


def test_intents_categories_and_balance(rows):
    assert len(datagen.INTENTS) >= 24 and len(set(datagen.INTENTS.values())) >= 10
    counts = Counter(r["intent"] for r in rows)
    assert len(counts) >= 24 and set(counts) == set(datagen.INTENTS)
    assert len({r["category"] for r in rows}) >= 10
    assert max(counts.values()) - min(counts.values()) <= 1
    for r in rows:
        assert r["category"] == datagen.INTENTS[r["intent"]]
        assert re.fullmatch(r"[A-Z]+", r["category"]) and re.fullmatch(r"[a-z]+(_[a-z]+)*", r["intent"])


def test_deterministic_per_seed():
    first = datagen.to_csv_bytes(datagen.generate_rows(300, seed=7))
    assert first == datagen.to_csv_bytes(datagen.generate_rows(300, seed=7))
    assert first != datagen.to_csv_bytes(datagen.generate_rows(300, seed=8))


def test_flags_use_known_letters_sorted(rows):
    seen = Counter()
    for r in rows:
        flags = r["flags"]
        assert set(flags) <= datagen.FLAG_LETTERS and "B" in flags
        assert flags == "".join(sorted(set(flags)))
        seen.update(flags)
    assert set(seen) == set("BEIKLPQZ")
    assert sum(len(r["flags"]) > 1 for r in rows) > len(rows) // 2  # most rows carry at least one variation


def test_interrogative_rows_are_questions(rows):
    assert all(r["instruction"].endswith("?") for r in with_flag(rows, "I"))
    assert not any(r["instruction"].endswith("?") for r in with_flag(rows, "I", present=False))


def test_keyword_rows_are_short(rows):
    for r in with_flag(rows, "K"):
        assert len(strip_placeholders(r["instruction"]).split()) <= 8, r
        assert not r["instruction"].endswith("?")


def test_colloquial_rows_show_colloquial_markers(rows):
    for r in with_flag(rows, "Q"):
        assert tokens(r["instruction"]) & datagen.COLLOQUIAL_MARKERS, r
    for r in with_flag(rows, "Q", present=False):
        assert not tokens(r["instruction"]) & datagen.COLLOQUIAL_MARKERS, r


def test_polite_rows_show_politeness(rows):
    def polite(text: str) -> bool:
        return bool(tokens(text) & datagen.POLITE_MARKERS) or any(p in text.lower() for p in POLITE_PHRASES)

    assert all(polite(r["instruction"]) for r in with_flag(rows, "P"))
    assert not any(polite(r["instruction"]) for r in with_flag(rows, "P", present=False))


def test_expanded_rows_have_no_contractions(rows):
    for r in with_flag(rows, "E"):
        assert not CONTRACTION_RE.search(strip_placeholders(r["instruction"])), r
    assert any(CONTRACTION_RE.search(r["instruction"]) for r in with_flag(rows, "E", present=False))


def test_noise_changes_text_but_keeps_placeholders(examples):
    noisy = 0
    for row, clean in examples:
        text = row["instruction"]
        if "Z" not in row["flags"]:
            assert text == clean
            continue
        noisy += 1
        assert text != clean
        assert PLACEHOLDER_RE.findall(text) == PLACEHOLDER_RE.findall(clean)
        assert len(text.split()) == len(clean.split())  # typos stay inside words
        assert abs(len(text) - len(clean)) <= 2
    assert noisy > 50


def test_add_noise_direct():
    text = "I want to check invoice {{Invoice Number}} for order {{Order Number}} on {{Website URL}}"
    outputs = {datagen.add_noise(text, random.Random(seed)) for seed in range(40)}
    assert text not in outputs and len(outputs) > 20
    for out in outputs:
        assert PLACEHOLDER_RE.findall(out) == PLACEHOLDER_RE.findall(text)
    assert datagen.add_noise("{{Order Number}} ok", random.Random(0)) == "{{Order Number}} ok"


def test_expand_contractions_helper():
    assert datagen.expand_contractions("I'm sure I don't know, what's {{Order Number}}") == (
        "I am sure I do not know, what is {{Order Number}}")


def test_placeholders_are_known_and_intact(rows):
    for r in rows:
        for field in ("instruction", "response"):
            text = r[field]
            assert set(PLACEHOLDER_RE.findall(text)) <= datagen.PLACEHOLDERS, text
            assert "{" not in PLACEHOLDER_RE.sub("", text) and "}" not in PLACEHOLDER_RE.sub("", text), text
    assert sum("{{" in r["instruction"] for r in rows) > len(rows) // 5


def test_responses_are_helpful_multi_sentence(rows):
    for r in rows:
        assert r["response"].strip()
        assert 2 <= count_sentences(r["response"]) <= 8, r["response"]
    assert any(re.search(r"(?m)^1\. ", r["response"]) and "\n" in r["response"] for r in rows)
    per_intent = Counter((r["intent"], r["response"]) for r in rows)
    assert all(sum(1 for i, _ in per_intent if i == name) >= 3 for name in datagen.INTENTS)


def test_round_trip_file_and_fileobj(rows, tmp_path):
    path = tmp_path / "demo.csv"
    datagen.write_csv(rows, path)
    with open(path, newline="", encoding="utf-8") as fh:
        header, back = read_support_csv(fh)
    assert header == HEADER and back == rows
    assert path.read_bytes() == datagen.to_csv_bytes(rows)

    buf = io.StringIO(newline="")
    datagen.write_csv(rows[:50], buf)
    buf.seek(0)
    assert read_support_csv(buf)[1] == rows[:50]
    assert any("\n" in r["response"] for r in back)


def test_duplicate_instruction_rate_is_low():
    sample = datagen.generate_rows(2000, seed=3)
    duplicates = len(sample) - len({r["instruction"] for r in sample})
    assert duplicates / len(sample) < 0.05


def test_same_reader_as_real_bitext_sample(rows):
    if not BITEXT_SAMPLE.is_file():
        pytest.skip("real Bitext sample not available")
    with open(BITEXT_SAMPLE, newline="", encoding="utf-8") as fh:
        header, real = read_support_csv(fh)
    assert header == list(datagen.FIELDNAMES)
    assert real and set(real[0]) == set(rows[0])
    mine_header, mine = read_support_csv(io.StringIO(datagen.to_csv_bytes(rows).decode("utf-8")))
    assert mine_header == header and len(mine) == len(rows)


def test_generation_is_fast():
    start = time.perf_counter()
    datagen.generate_rows(2400, seed=1)
    assert time.perf_counter() - start < 1.0


def ctx(**inputs) -> StepContext:
    return StepContext("generate_demo_data", "test", Config(), inputs=inputs)


def test_run_writes_local_folder(tmp_path):
    dest = tmp_path / "demo" / "out"
    manifest = generate_demo_data.run(ctx(rows="120", seed="3", dest=str(dest)))
    target = dest / datagen.FILE_NAME
    data = target.read_bytes()
    assert manifest == {"dest_uri": str(target), "rows": 120, "intents": len(datagen.INTENTS),
                        "categories": len(set(datagen.INTENTS.values())), "sha256": hashlib.sha256(data).hexdigest()}
    assert data == datagen.to_csv_bytes(datagen.generate_rows(120, seed=3))


def test_run_defaults_and_s3(monkeypatch):
    from tasks.io import s3

    calls = []
    monkeypatch.setattr(s3, "put_bytes", lambda uri, data, content_type="": calls.append((uri, data, content_type)))
    manifest = generate_demo_data.run(ctx(dest="s3://bucket/demo/"))
    assert manifest["dest_uri"] == "s3://bucket/demo/demo_support_conversations.csv"
    assert manifest["rows"] == 2400
    (uri, data, content_type), = calls
    assert uri == manifest["dest_uri"] and content_type == "text/csv"
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
    assert data == datagen.to_csv_bytes(datagen.generate_rows(2400, seed=0))


@pytest.mark.parametrize("inputs", [{}, {"rows": "10"}, {"dest": "  "}, {"dest": "x", "rows": "many"},
                                    {"dest": "x", "seed": "-"}])
def test_run_rejects_bad_inputs(inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StepError, match="generate_demo_data"):
        generate_demo_data.run(ctx(**inputs))


def test_cli_writes_csv(tmp_path):
    out = tmp_path / "demo.csv"
    assert datagen.main(["--rows", "40", "--seed", "2", "--out", str(out)]) == 0
    assert out.read_bytes() == datagen.to_csv_bytes(datagen.generate_rows(40, seed=2))


# The intent and phrase tables live in tasks/demo/intents.yaml, read and validated once at import.

INTENT_KEYS = ["category", "templates", "actions", "keywords", "openers", "bodies"]


def data_text() -> str:
    return resources.files("tasks.demo").joinpath(datagen.DATA_FILE).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def raw_tables() -> dict:
    return yaml.safe_load(data_text())


def strings(tree):
    """Every leaf of the parsed YAML (mapping keys included) with its path."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield key, key
            for path, leaf in strings(value):
                yield f"{key}.{path}", leaf
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            for path, leaf in strings(value):
                yield f"[{i}].{path}", leaf
    else:
        yield "", tree


def test_data_file_is_well_formed(raw_tables):
    assert list(raw_tables) == list(datagen.TABLE_NAMES)
    intents = raw_tables["intents"]
    assert list(intents) == list(datagen.INTENTS) and len(intents) >= 24
    for name, entry in intents.items():
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", name)
        assert list(entry) == INTENT_KEYS, name
        assert isinstance(entry["category"], str) and re.fullmatch(r"[A-Z]+", entry["category"]), name
        assert entry["category"] == datagen.INTENTS[name]
        for field in INTENT_KEYS[1:]:
            assert isinstance(entry[field], list) and entry[field], (name, field)
            for text in entry[field]:
                assert isinstance(text, str) and text.strip() == text and text, (name, field, text)
                assert set(PLACEHOLDER_RE.findall(text)) <= datagen.PLACEHOLDERS, (name, field, text)
                rest = re.sub(r"\[[^\[\]]+\]", "", PLACEHOLDER_RE.sub("", text))
                assert not set(rest) & set("{}[]"), (name, field, text)
    for table in ("frames", "question_frames"):
        assert all(PLACEHOLDER_RE.sub("", f).count("{a}") == 1 for f in raw_tables[table]), table
    assert all(f.endswith("?") for f in raw_tables["question_frames"])
    assert all(g == g.lower() for g in raw_tables["greetings"])
    assert set(raw_tables["variation_weights"]) == datagen.FLAG_LETTERS - {"B"}
    # YAML turns unquoted no/yes/on/off and numbers into bools and ints: only the weights may be anything but text
    for path, leaf in strings({k: v for k, v in raw_tables.items() if k != "variation_weights"}):
        assert isinstance(leaf, str), (path, leaf)
    assert all(type(w) is int and w > 0 for w in raw_tables["variation_weights"].values())
    # the module's tables are exactly the file's, validated
    assert datagen.build_tables(copy.deepcopy(raw_tables)) == datagen.read_tables() == datagen._TABLES


def test_data_file_ships_in_the_wheel():
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not running from a source checkout")
    package_data = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch(f"demo/{datagen.DATA_FILE}", pattern) for pattern in package_data["tasks"])


def _set(path: tuple, value):
    def mutate(raw):
        node = raw
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _delete(path: tuple):
    def mutate(raw):
        node = raw
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


@pytest.mark.parametrize(("mutate", "message"), [
    (_delete(("intents", "cancel_order", "category")), r"intent 'cancel_order', field 'category': missing"),
    (_delete(("intents", "track_order", "bodies")), r"intent 'track_order', field 'bodies': missing"),
    (_set(("intents", "change_order", "templates"), []),
     r"intent 'change_order', field 'templates': expected a non-empty list"),
    (_set(("intents", "place_order", "openers"), "one opener"),
     r"intent 'place_order', field 'openers': expected a non-empty list of strings, got str"),
    (_set(("intents", "track_order", "bodies", 1), "Ask the carrier with {{Tracking Code}}."),
     r"intent 'track_order', field 'bodies'\[1\]: unknown placeholder \{\{Tracking Code\}\}"),
    (_set(("intents", "get_refund", "keywords", 0), False),
     r"intent 'get_refund', field 'keywords'\[0\]: expected a string, got bool False"),
    (_set(("intents", "review", "actions", 2), 404),
     r"intent 'review', field 'actions'\[2\]: expected a string, got int 404"),
    (_set(("intents", "complaint", "templates", 0), "I want to [complain|object about order"),
     r"intent 'complaint', field 'templates'\[0\]: unbalanced or nested \[a\|b\] alternation"),
    (_set(("intents", "complaint", "openers", 0), "Sorry about order {Order Number}."),
     r"intent 'complaint', field 'openers'\[0\]: brace outside"),
    (_set(("intents", "cancel_order", "category"), "Order"), r"intent 'cancel_order', field 'category': must be upper"),
    (_set(("intents", "cancel_order", "responses"), ["Done."]), r"intent 'cancel_order', field 'responses': unknown"),
    (_set(("intents", "cancel_order"), ["not", "a", "mapping"]), r"intent 'cancel_order': expected a mapping"),
    (_set(("intents", "Cancel-Order"), {}), r"intent 'Cancel-Order': intent names are lower_snake_case"),
    (_set(("intents",), {}), r"table 'intents': expected a non-empty mapping"),
    (_delete(("closings",)), r"table 'closings': missing"),
    (_set(("openers",), ["Hi."]), r"table 'openers': unknown table"),
    (_set(("frames", 0), "I need to do it"), r"table 'frames'\[0\]: a frame needs exactly one \{a\}"),
    (_set(("question_frames", 1), "can you help me {a}"), r"table 'question_frames'\[1\]: must end with '\?'"),
    (_set(("greetings", 0), "Hi, "), r"table 'greetings'\[0\]: must be lower case"),
    (_set(("closings", 2), "Call {{Support Line}}."), r"table 'closings'\[2\]: unknown placeholder"),
    (_delete(("variation_weights", "K")), r"table 'variation_weights', letter 'K': missing"),
    (_set(("variation_weights", "Z"), True), r"table 'variation_weights', letter 'Z': expected a positive integer"),
    (_set(("synonyms", "Order"), ["purchase"]), r"table 'synonyms', key 'Order': must be lower case"),
    (_set(("synonyms", "order"), "purchase"), r"table 'synonyms', key 'order': expected a non-empty list"),
    (_set(("contractions", "i'm"), None), r"table 'contractions', key \"i'm\": expected a string, got NoneType"),
    (_set(("colloquial", "you"), "yall"), r"table 'colloquial', key 'you': 'yall' is not in COLLOQUIAL_MARKERS"),
])
def test_malformed_tables_name_the_intent_and_field(raw_tables, mutate, message):
    raw = copy.deepcopy(raw_tables)
    mutate(raw)
    with pytest.raises(ValueError, match=r"^intents\.yaml: " + message):
        datagen.build_tables(raw)


@pytest.mark.parametrize(("old", "new", "message"), [
    # unquoted YAML scalars that are not strings
    ("      - order cancellation\n", "      - no\n",
     r"intent 'cancel_order', field 'keywords'\[1\]: expected a string, got bool False \(quote it"),
    ("      - order cancellation\n", "      - 404\n", r"intent 'cancel_order', field 'keywords'\[1\]: .* got int 404"),
    ("  change_order:\n", "  cancel_order:\n", r"invalid YAML: .*duplicate key 'cancel_order'"),
    ("intents:\n", "intents: [\n", r"invalid YAML"),
])
def test_yaml_pitfalls_are_refused(old, new, message):
    text = data_text()
    assert text.count(old) == 1
    with pytest.raises(ValueError, match=r"^intents\.yaml: " + message):
        datagen.read_tables(text.replace(old, new))
    with pytest.raises(ValueError, match=r"^intents\.yaml: expected a mapping of tables"):
        datagen.read_tables("- just\n- a list\n")
