"""Simulated chat traffic: conversations against a running chat service, rated through its real feedback API.

    python -m tasks.demo.traffic --url http://127.0.0.1:8000 --chats 200

Questions come from the demo data generator (the same intents the demo model learnt); each simulated user opens a
conversation, asks, and rates the reply with ``POST /api/messages/<id>/feedback`` as a person would with the thumbs.
How a user rates is a ``Rater``: ``by_reference`` (the demo: thumbs up when the reply shares enough words with the
generator's reference answer) or ``by_version`` (tests: a chosen thumbs-down rate per model version, deterministic
per seed). The summary counts failed requests; a 429 is waited out (Retry-After) like a polite client, not a failure.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

Rater = Callable[[random.Random, dict, str], int | None]  # (the chat's rng, reply message, reference) -> +1/-1/None


def questions(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(question, reference answer) pairs from the demo generator."""
    from tasks.demo import datagen

    return [(r["instruction"], r["response"]) for r in datagen.generate_rows(n, seed)]


def by_version(thumbs_down: dict[str, float], default: float = 0.1, rated: float = 1.0) -> Rater:
    """Users rate a share ``rated`` of replies; a reply of version v gets a thumbs-down with probability
    ``thumbs_down.get(v, default)``, else a thumbs-up."""
    def rate(rng: random.Random, message: dict, reference: str) -> int | None:
        if rng.random() >= rated:
            return None
        return -1 if rng.random() < thumbs_down.get(str(message.get("model_version")), default) else 1
    return rate


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']{3,}", text.lower()))


def by_reference(min_overlap: float = 0.25, rated: float = 0.8) -> Rater:
    """Users rate a share ``rated`` of replies: thumbs-down for an empty or cut-off reply or one sharing less than
    ``min_overlap`` of the reference answer's words, thumbs-up otherwise."""
    def rate(rng: random.Random, message: dict, reference: str) -> int | None:
        if rng.random() >= rated:
            return None
        ref, got = _words(reference), _words(message.get("content") or "")
        if not got or message.get("finish_reason") not in ("stop", "length"):
            return -1
        return 1 if len(ref & got) >= min_overlap * max(1, len(ref)) else -1
    return rate


@dataclass
class Summary:
    chats: int = 0
    failed: int = 0
    rate_limited: int = 0
    by_version: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, version: str | None, rating: int | None) -> None:
        with self.lock:
            self.chats += 1
            v = self.by_version.setdefault(str(version), {"chats": 0, "up": 0, "down": 0})
            v["chats"] += 1
            if rating is not None:
                v["up" if rating > 0 else "down"] += 1

    def fail(self, what: str) -> None:
        with self.lock:
            self.failed += 1
            if len(self.failures) < 10:
                self.failures.append(what[:300])

    def to_dict(self) -> dict:
        return {"chats": self.chats, "failed": self.failed, "rate_limited": self.rate_limited,
                "by_version": self.by_version, "failures": self.failures}


class Client:
    """The three calls of a simulated user, with urllib; a 429 is retried after its Retry-After."""

    def __init__(self, url: str, summary: Summary, timeout: float = 120):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"chat service URL {url!r} is not http(s)")
        self.url, self.summary, self.timeout = url.rstrip("/"), summary, timeout

    def call(self, path: str, body: dict, token: str | None = None) -> dict:
        headers = {"Content-Type": "application/json", **({"X-Client-Token": token} if token else {})}
        for _ in range(20):
            req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(), method="POST",  # noqa: S310
                                         headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310 - scheme checked
                    return json.loads(r.read())
            except urllib.error.HTTPError as exc:
                if exc.code != 429:
                    raise
                with self.summary.lock:
                    self.summary.rate_limited += 1
                time.sleep(min(30.0, float(exc.headers.get("Retry-After") or 1)))
        raise RuntimeError(f"{path}: still rate limited after 20 tries")

    def chat(self, question: str) -> dict:
        conv = self.call("/api/conversations", {})
        reply = self.call(f"/api/conversations/{conv['conversation_id']}/messages",
                          {"content": question, "stream": False}, conv["client_token"])
        return {**reply["message"], "client_token": conv["client_token"]}

    def rate(self, message: dict, rating: int) -> None:
        self.call(f"/api/messages/{message['id']}/feedback", {"rating": rating}, message["client_token"])


def drive(url: str, chats: int, rater: Rater | None = None, *, workers: int = 4, seed: int = 0,
          stop: threading.Event | None = None, qs: list[tuple[str, str]] | None = None) -> dict:
    """Run ``chats`` simulated conversations (``workers`` at a time) and rate each reply with ``rater``; stops early
    when ``stop`` is set. Returns the summary: chats, failed requests, and per model version chats/up/down."""
    summary, rater = Summary(), rater or by_reference()
    qs = qs or questions(max(chats, 1), seed)
    client = Client(url, summary)

    def one(i: int) -> None:
        if stop is not None and stop.is_set():
            return
        rng = random.Random(f"{seed}:{i}")
        question, reference = qs[i % len(qs)]
        try:
            message = client.chat(question)
            rating = rater(rng, message, reference)
            if rating is not None:
                client.rate(message, rating)
            summary.add(message.get("model_version"), rating)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # HTTPError and URLError are OSErrors
            summary.fail(f"chat {i}: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(chats)))
    return summary.to_dict()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.demo.traffic", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--chats", type=int, default=100)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(drive(args.url, args.chats, workers=args.workers, seed=args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
