"""Seeded generator of a Bitext-schema e-commerce customer-support dataset (synthetic, our own templates).

The CSV has the columns of the public Bitext customer-support dataset, ``flags,instruction,category,intent,response``,
so the demo pipeline reads it with the same code path as the real data. Placeholders such as ``{{Order Number}}`` stay
literally in the text, as Bitext does. The intent and phrase tables (templates, responses, synonyms...) live in
``intents.yaml`` beside this module, read and validated once at import (``read_tables``). The ``flags`` column lists
the Bitext variation letters actually applied:

    B basic syntax (always)      I interrogative (ends with '?')   K keyword style (short)
    L lexical (synonyms)         E expanded contractions           P politeness
    Q colloquial ("wanna", "u")  Z noise (seeded typos, placeholders untouched)

Run it from the repository root:

    python -m tasks.demo.datagen --rows 2400 --seed 0 --out demo.csv

or as a platform step (writes ``demo_support_conversations.csv`` under ``dest``):

    python -m tasks generate_demo_data --input dest=s3://bucket/demo/ --input rows=2400 --input seed=0
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import sys
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

FIELDNAMES = ("flags", "instruction", "category", "intent", "response")
FILE_NAME = "demo_support_conversations.csv"
DATA_FILE = "intents.yaml"  # the intent and phrase tables, beside this module
FLAG_LETTERS = frozenset("BEIKLPQZ")
_MAX_TRIES = 4

PLACEHOLDERS = frozenset({
    "Order Number", "Account Type", "Account Category", "Refund Amount", "Currency Symbol",
    "Customer Support Phone Number", "Customer Support Hours", "Customer Support Email", "Website URL",
    "Invoice Number", "Delivery City", "Delivery Country", "Online Order Interaction", "Online Company Portal Info",
    "Person Name", "Date Range", "Login Page URL", "Store Location", "Settings",
})

# Words that mark a variation; noise never touches them so the flag stays visible.
POLITE_MARKERS = frozenset({"please", "pls", "plz", "thank", "thanks", "thx", "kindly", "appreciate"})
COLLOQUIAL_MARKERS = frozenset({"wanna", "gonna", "gotta", "lemme", "pls", "thx", "u", "ur", "ya", "yo", "hey", "im",
                                "dont", "cant"})


@dataclass(frozen=True)
class Intent:
    category: str
    templates: tuple[str, ...]  # statements; "[a|b]" picks one alternative
    actions: tuple[str, ...]  # infinitive verb phrases, used for questions and generic frames
    keywords: tuple[str, ...]  # short keyword-style requests
    openers: tuple[str, ...]  # first sentence(s) of a response
    bodies: tuple[str, ...]  # middle of a response (some with numbered steps)


INTENT_FIELDS = ("templates", "actions", "keywords", "openers", "bodies")
_PHRASE_LISTS = ("closings", "frames", "question_frames", "polite_prefixes", "polite_suffixes",
                 "polite_question_prefixes", "greetings", "keyword_tails")
_PHRASE_MAPS = ("synonyms", "contractions", "colloquial")
TABLE_NAMES = ("intents", *_PHRASE_LISTS, "variation_weights", *_PHRASE_MAPS)


@dataclass(frozen=True)
class Tables:
    """The contents of ``intents.yaml``, validated; lists become tuples, mapping order is the file's order."""

    intents: dict[str, Intent]
    closings: tuple[str, ...]
    frames: tuple[str, ...]
    question_frames: tuple[str, ...]
    polite_prefixes: tuple[str, ...]
    polite_suffixes: tuple[str, ...]
    polite_question_prefixes: tuple[str, ...]
    greetings: tuple[str, ...]
    keyword_tails: tuple[str, ...]
    variation_weights: dict[str, int]
    synonyms: dict[str, tuple[str, ...]]
    contractions: dict[str, str]
    colloquial: dict[str, str]


_PLACEHOLDER = r"(\{\{[^{}]*\}\})"
_PLACEHOLDER_RE = re.compile(_PLACEHOLDER)
_ALTERNATION_RE = re.compile(r"\[([^\[\]]+)\]")
_INTENT_NAME_RE = re.compile(r"[a-z]+(_[a-z]+)*")
_CATEGORY_RE = re.compile(r"[A-Z]+")


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """yaml's safe loader, refusing repeated mapping keys (a second entry of an intent would silently win)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, Hashable):
                    if key in seen:
                        raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                                key_node.start_mark)
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _text(value, where: str, *, empty_ok: bool = False, frame: bool = False) -> str:
    """One string of the tables: known placeholders only, balanced ``[a|b]``, ``{a}`` exactly once in frames."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__} {value!r} (quote it in the YAML)")
    if not value and not empty_ok:
        raise ValueError(f"{where}: empty string")
    unknown = sorted(set(_PLACEHOLDER_RE.findall(value)) - {f"{{{{{p}}}}}" for p in PLACEHOLDERS})
    if unknown:
        raise ValueError(f"{where}: unknown placeholder {', '.join(unknown)} (not in datagen.PLACEHOLDERS)")
    rest = _PLACEHOLDER_RE.sub("", value)
    if frame:
        if rest.count("{a}") != 1:
            raise ValueError(f"{where}: a frame needs exactly one {{a}} (the intent's action): {value!r}")
        rest = rest.replace("{a}", "")
    if "{" in rest or "}" in rest:
        raise ValueError(f"{where}: brace outside a {{{{Placeholder}}}}: {value!r}")
    rest = _ALTERNATION_RE.sub("", rest)
    if "[" in rest or "]" in rest:
        raise ValueError(f"{where}: unbalanced or nested [a|b] alternation: {value!r}")
    return value


def _texts(value, where: str, **kw) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of strings, got {type(value).__name__}")
    return tuple(_text(v, f"{where}[{i}]", **kw) for i, v in enumerate(value))


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: expected a non-empty mapping, got {type(value).__name__}")
    return value


def _check_keys(entry: dict, expected: tuple[str, ...], prefix: str, what: str) -> None:
    """``prefix`` names the entry and the kind of key, e.g. "intents.yaml: intent 'x', field"."""
    for key in expected:
        if key not in entry:
            raise ValueError(f"{prefix} {key!r}: missing")
    for key in entry:
        if key not in expected:
            raise ValueError(f"{prefix} {key!r}: unknown {what} (expected {', '.join(expected)})")


def _lower_key(key, where: str) -> str:
    key = _text(key, f"{where}, key {key!r}")
    if key != key.lower():
        raise ValueError(f"{where}, key {key!r}: must be lower case (matches are looked up lowercased)")
    return key


def _intent(name, entry, where: str) -> Intent:
    if not isinstance(name, str) or not _INTENT_NAME_RE.fullmatch(name):
        raise ValueError(f"{where}: intent names are lower_snake_case strings")
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with the fields category, {', '.join(INTENT_FIELDS)}")
    _check_keys(entry, ("category", *INTENT_FIELDS), f"{where}, field", "field")
    category = _text(entry["category"], f"{where}, field 'category'")
    if not _CATEGORY_RE.fullmatch(category):
        raise ValueError(f"{where}, field 'category': must be upper-case letters, got {category!r}")
    return Intent(category, *(_texts(entry[f], f"{where}, field {f!r}") for f in INTENT_FIELDS))


def build_tables(raw, source: str = DATA_FILE) -> Tables:
    """Validate the parsed YAML tables; a malformed entry raises ValueError naming the intent (or table) and field."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping of tables at the top level, got {type(raw).__name__}")
    _check_keys(raw, TABLE_NAMES, f"{source}: table", "table")
    intents = {name: _intent(name, entry, f"{source}: intent {name!r}")
               for name, entry in _mapping(raw["intents"], f"{source}: table 'intents'").items()}
    lists = {}
    for table in _PHRASE_LISTS:
        where = f"{source}: table {table!r}"
        lists[table] = _texts(raw[table], where, frame=table.endswith("frames"), empty_ok=table == "keyword_tails")
    for i, frame in enumerate(lists["question_frames"]):
        if not frame.endswith("?"):
            raise ValueError(f"{source}: table 'question_frames'[{i}]: must end with '?': {frame!r}")
    for i, greeting in enumerate(lists["greetings"]):
        if greeting != greeting.lower():
            raise ValueError(f"{source}: table 'greetings'[{i}]: must be lower case: {greeting!r}")

    where = f"{source}: table 'variation_weights'"
    weights = _mapping(raw["variation_weights"], where)
    _check_keys(weights, tuple(sorted(FLAG_LETTERS - {"B"})), f"{where}, letter", "letter")
    for letter, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
            raise ValueError(f"{where}, letter {letter!r}: expected a positive integer, got {weight!r}")

    maps = {}
    for table in _PHRASE_MAPS:
        where = f"{source}: table {table!r}"
        maps[table] = {_lower_key(k, where): v for k, v in _mapping(raw[table], where).items()}
    synonyms = {k: _texts(v, f"{source}: table 'synonyms', key {k!r}") for k, v in maps["synonyms"].items()}
    contractions = {k: _text(v, f"{source}: table 'contractions', key {k!r}") for k, v in maps["contractions"].items()}
    colloquial = {k: _text(v, f"{source}: table 'colloquial', key {k!r}") for k, v in maps["colloquial"].items()}
    for key, form in colloquial.items():
        if form.lower() not in COLLOQUIAL_MARKERS:
            raise ValueError(f"{source}: table 'colloquial', key {key!r}: {form!r} is not in COLLOQUIAL_MARKERS "
                             "(the Q flag must stay visible and noise-proof)")
    return Tables(intents=intents, **lists, variation_weights=dict(weights), synonyms=synonyms,
                  contractions=contractions, colloquial=colloquial)


def read_tables(text: str | None = None, source: str = DATA_FILE) -> Tables:
    """Parse and validate the tables: ``text`` (YAML) or, by default, the ``intents.yaml`` shipped with this package."""
    if text is None:
        text = resources.files("tasks.demo").joinpath(DATA_FILE).read_text(encoding="utf-8")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: invalid YAML: {exc}") from None
    return build_tables(raw, source)


_TABLES = read_tables()
_SPECS: dict[str, Intent] = _TABLES.intents
INTENTS: dict[str, str] = {name: spec.category for name, spec in _SPECS.items()}
_CLOSINGS = _TABLES.closings
_FRAMES = _TABLES.frames  # generic statement frames around an intent's action
_QUESTION_FRAMES = _TABLES.question_frames
_POLITE_PREFIXES = _TABLES.polite_prefixes
_POLITE_SUFFIXES = _TABLES.polite_suffixes
_POLITE_QUESTION_PREFIXES = _TABLES.polite_question_prefixes
_GREETINGS = _TABLES.greetings
_KEYWORD_TAILS = _TABLES.keyword_tails
_VARIATION_WEIGHTS = _TABLES.variation_weights  # relative frequency of each variation letter
_SYNONYMS = _TABLES.synonyms
_CONTRACTIONS = _TABLES.contractions
_COLLOQUIAL = _TABLES.colloquial
_PROTECTED = POLITE_MARKERS | COLLOQUIAL_MARKERS | {"could", "would"}
_CONTRACTION_RE = re.compile(_PLACEHOLDER + r"|\b(" + "|".join(map(re.escape, _CONTRACTIONS)) + r")\b", re.IGNORECASE)
_WORD_RE = re.compile(_PLACEHOLDER + r"|[A-Za-z]{4,}")


def _sub_outside(pattern: str, repl, text: str, flags: int = 0) -> str:
    """re.sub that never touches ``{{...}}`` placeholders."""
    rx = re.compile(_PLACEHOLDER + "|" + pattern, flags)
    return rx.sub(lambda m: m.group(1) or repl(m), text)


def _phrase_pattern(phrases) -> str:
    return r"\b(?:" + "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)) + r")\b"


def _present(phrases, text: str, flags: int = 0) -> list[str]:
    """The phrases (lowercased) that occur in ``text`` outside placeholders."""
    rx = re.compile(_PLACEHOLDER + "|" + _phrase_pattern(phrases), flags)
    return sorted({m.group(0).lower() for m in rx.finditer(text) if not m.group(1)})


def _expand(template: str, rng: random.Random) -> str:
    return _ALTERNATION_RE.sub(lambda m: rng.choice(m.group(1).split("|")), template)


def _fix_articles(text: str) -> str:
    """Fix articles after a synonym swap: "a item" -> "an item", "an product" -> "a product"."""
    def repl(m: re.Match) -> str:
        return m.group(3) + ("n " if m.group(4).lower() in "aeiou" else " ") + m.group(4)  # group 1 = placeholder

    return _sub_outside(r"\b((A|a)n?) ([A-Za-z])", repl, text)


def _lexical(text: str, rng: random.Random) -> str:
    """L: swap one or two words/phrases for synonyms."""
    found = _present(_SYNONYMS, text)
    if not found:
        return text
    chosen = {p: rng.choice(_SYNONYMS[p]) for p in rng.sample(found, min(len(found), rng.choice((1, 1, 2))))}
    text = _sub_outside(_phrase_pattern(chosen), lambda m: chosen[m.group(0)], text)
    return _fix_articles(text)


def _match_case(src: str, dst: str) -> str:
    return dst[0].upper() + dst[1:] if src[0].isupper() else dst[0].lower() + dst[1:]


def expand_contractions(text: str) -> str:
    """E: "I'm" -> "I am", "don't" -> "do not" (placeholders untouched)."""
    return _CONTRACTION_RE.sub(lambda m: m.group(1) or _match_case(m.group(2), _CONTRACTIONS[m.group(2).lower()]),
                               text)


def _greeting(text: str) -> str:
    """The greeting the text starts with ("" when none)."""
    return next((g for g in _GREETINGS if text.lower().startswith(g)), "")


def _polite(text: str, rng: random.Random, question: bool) -> str:
    """P: add a courtesy formula; questions keep their final '?', greetings stay in front."""
    prefix_ok = not _greeting(text) and rng.random() < 0.5
    if question:
        return rng.choice(_POLITE_QUESTION_PREFIXES) + text if prefix_ok else text[:-1] + ", please?"
    return rng.choice(_POLITE_PREFIXES) + text if prefix_ok else text + rng.choice(_POLITE_SUFFIXES)


def _lower_outside(text: str) -> str:
    return _sub_outside(r"[^{}]+", lambda m: m.group(0).lower(), text)


def _colloquial(text: str, rng: random.Random, question: bool) -> str:
    """Q: "want to" -> "wanna", "you" -> "u"...; falls back to a chatty opener so the register always shows."""
    found = _present(_COLLOQUIAL, text, re.IGNORECASE)
    keep = {p for p in found if rng.random() < 0.7}
    if keep:
        text = _sub_outside(_phrase_pattern(keep), lambda m: _COLLOQUIAL[m.group(0).lower()], text, re.IGNORECASE)
    else:
        greeting = _greeting(text)
        text = "hey, " + text[len(greeting):] if greeting else rng.choice(("hey ", "yo ")) + text
    if rng.random() < 0.5:
        text = _lower_outside(text)
    if not question and text[-1] in ".!" and rng.random() < 0.5:
        text = text[:-1]
    return text


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    op = rng.choice(("swap", "drop", "double"))
    if op == "swap" and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "double":
        return word[:i] + word[i] + word[i:]
    return word[:i] + word[i + 1:]


def add_noise(text: str, rng: random.Random) -> str:
    """Z: one or two seeded typos (swapped, dropped or doubled letters) outside placeholders and marker words."""
    spans = [m.span() for m in _WORD_RE.finditer(text) if not m.group(1) and m.group(0).lower() not in _PROTECTED]
    if not spans:
        return text
    for start, end in sorted(rng.sample(spans, min(len(spans), rng.choice((1, 1, 2)))), reverse=True):
        text = text[:start] + _typo(text[start:end], rng) + text[end:]
    return text


def _pick_variations(rng: random.Random) -> set[str]:
    pool = dict(_VARIATION_WEIGHTS)
    picked: set[str] = set()
    for _ in range(rng.choices((0, 1, 2, 3), weights=(12, 38, 32, 18))[0]):
        letter = rng.choices(list(pool), weights=list(pool.values()))[0]
        picked.add(letter)
        del pool[letter]
    if "K" in picked:
        picked -= {"I", "P", "E"}
    return picked


def _base_text(spec: Intent, picked: set[str], rng: random.Random) -> str:
    if "K" in picked:
        return _expand(rng.choice(spec.keywords), rng) + rng.choice(_KEYWORD_TAILS)
    if "I" in picked:
        text = _expand(rng.choice(_QUESTION_FRAMES), rng).replace("{a}", _expand(rng.choice(spec.actions), rng))
    elif rng.random() < 0.3:
        text = _expand(rng.choice(_FRAMES), rng).replace("{a}", _expand(rng.choice(spec.actions), rng))
    else:
        text = _expand(rng.choice(spec.templates), rng)
    return rng.choice(_GREETINGS) + text if rng.random() < 0.2 else text


def _instruction(spec: Intent, rng: random.Random) -> tuple[str, str, str]:
    """Returns (instruction, instruction before noise, flags)."""
    picked = _pick_variations(rng)
    text = _base_text(spec, picked, rng)
    applied = {"B"} | (picked & {"I", "K"})
    question = "I" in picked
    steps = (("L", lambda t: _lexical(t, rng)), ("E", expand_contractions),
             ("P", lambda t: _polite(t, rng, question)), ("Q", lambda t: _colloquial(t, rng, question)))
    for letter, fn in steps:
        if letter in picked:
            new = fn(text)
            if new != text:
                applied.add(letter)
                text = new
    clean = text
    if "Z" in picked:
        text = add_noise(text, rng)
        if text != clean:
            applied.add("Z")
    return text, clean, "".join(sorted(applied))


def _response(spec: Intent, rng: random.Random) -> str:
    return f"{rng.choice(spec.openers)} {rng.choice(spec.bodies)}\n\n{rng.choice(_CLOSINGS)}"


def iter_examples(n_rows: int, seed: int = 0) -> Iterator[tuple[dict, str]]:
    """Yield ``(row, instruction_before_noise)``; the second item lets tests check what the Z flag changed."""
    rng = random.Random(seed)
    names = list(_SPECS)
    order = [names[i % len(names)] for i in range(n_rows)]
    rng.shuffle(order)
    seen: set[str] = set()
    for intent in order:
        spec = _SPECS[intent]
        for _ in range(_MAX_TRIES):  # redraw a few times when the instruction was already used
            instruction, clean, flags = _instruction(spec, rng)
            if instruction not in seen:
                break
        seen.add(instruction)
        row = {"flags": flags, "instruction": instruction, "category": spec.category, "intent": intent,
               "response": _response(spec, rng)}
        yield row, clean


def generate_rows(n_rows: int, seed: int = 0) -> list[dict]:
    """``n_rows`` Bitext-schema rows, intents balanced (counts differ by at most one), reproducible per seed."""
    return [row for row, _ in iter_examples(n_rows, seed)]


def write_csv(rows, path_or_fileobj) -> None:
    """Write rows as CSV (QUOTE_MINIMAL; multi-line responses are quoted) to a path or a text file object."""
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        with open(path_or_fileobj, "w", newline="", encoding="utf-8") as fh:
            write_csv(rows, fh)
        return
    writer = csv.DictWriter(path_or_fileobj, fieldnames=FIELDNAMES, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def to_csv_bytes(rows) -> bytes:
    buf = io.StringIO(newline="")
    write_csv(rows, buf)
    return buf.getvalue().encode("utf-8")


def store(dest: str, data: bytes) -> str:
    """Write the CSV under dest (an s3:// prefix or a local folder); returns where it went."""
    if dest.startswith("s3://"):
        from tasks.io import s3

        uri = s3.join(dest, FILE_NAME)
        s3.put_bytes(uri, data, "text/csv")
        return uri
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FILE_NAME).write_bytes(data)
    return str(folder / FILE_NAME)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.demo.datagen", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=FILE_NAME, help="CSV path, or '-' for stdout")
    args = p.parse_args(argv)
    rows = generate_rows(args.rows, args.seed)
    if args.out == "-":
        sys.stdout.buffer.write(to_csv_bytes(rows))
    else:
        write_csv(rows, args.out)
        summary = {"out": args.out, "rows": len(rows), "intents": len({r["intent"] for r in rows})}
        print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
