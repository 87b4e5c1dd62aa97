"""Simulated chat traffic: conversations against a running chat service, rated through its real feedback API.

    python -m tasks.demo.traffic --url http://127.0.0.1:8000 --chats 200

Questions come from the demo data generator (the same intents the demo model learnt); each simulated user opens a
conversation, asks, and rates the reply with ``POST /api/messages/<id>/feedback`` as a person would with the thumbs.
How a user rates is a ``Rater``: ``by_reference`` (the demo: thumbs up when the reply shares enough words with the
generator's reference answer) or ``by_version`` (tests: a chosen thumbs-down rate per model version, deterministic
per seed). The summary counts failed requests; a 429 is waited out (Retry-After) like a polite client, not a failure.

The public API does not say which model version (canary arm) a conversation is on: a client that knows it could steer
the verdict. With the chat service's admin token (default $ECB_CHAT_ADMIN_TOKEN) each chat's version is looked up once
through ``GET /admin/conversations/<id>``, for ``by_version`` and the summary's per-version counts; without it the
summary counts every chat under "unknown" and ``by_version`` refuses to start.
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

from tasks import env

Rater = Callable[[random.Random, dict, str], int | None]  # (the chat's rng, reply message, reference) -> +1/-1/None
UNKNOWN = "unknown"  # the summary's version of a chat whose version could not be looked up (no admin token)
NEEDS_ADMIN = ("rating by model version needs each reply's version, which only the chat service's admin API tells: "
               "give the admin token (ECB_CHAT_ADMIN_TOKEN)")


def questions(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(question, reference answer) pairs from the demo generator."""
    from tasks.demo import datagen

    return [(r["instruction"], r["response"]) for r in datagen.generate_rows(n, seed)]


def by_version(thumbs_down: dict[str, float], default: float = 0.1, rated: float = 1.0) -> Rater:
    """Users rate a share ``rated`` of replies; a reply of version v gets a thumbs-down with probability
    ``thumbs_down.get(v, default)``, else a thumbs-up."""
    def rate(rng: random.Random, message: dict, reference: str) -> int | None:
        if "model_version" not in message:
            raise LookupError(NEEDS_ADMIN)
        if rng.random() >= rated:
            return None
        return -1 if rng.random() < thumbs_down.get(str(message["model_version"]), default) else 1
    rate.needs_version = True  # drive() checks it has an admin token before the first chat
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
    """The calls of a simulated user, with urllib; a 429 is retried after its Retry-After. ``admin_token`` (default
    $ECB_CHAT_ADMIN_TOKEN, "" for none) lets ``chat`` look up the version its conversation is on."""

    def __init__(self, url: str, summary: Summary, timeout: float = 120, admin_token: str | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"chat service URL {url!r} is not http(s)")
        self.url, self.summary, self.timeout = url.rstrip("/"), summary, timeout
        self.admin_token = env.get("ECB_CHAT_ADMIN_TOKEN") if admin_token is None else admin_token

    def call(self, path: str, body: dict | None, token: str | None = None, method: str = "POST",
             headers: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json", **({"X-Client-Token": token} if token else {}),
                   **(headers or {})}
        data = None if body is None else json.dumps(body).encode()
        for _ in range(20):
            req = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)  # noqa: S310
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
        """The reply message, with its conversation's client_token and, given the admin token, its model_version."""
        conv = self.call("/api/conversations", {})
        cid = conv["conversation_id"]
        reply = self.call(f"/api/conversations/{cid}/messages", {"content": question, "stream": False},
                          conv["client_token"])
        message = {**reply["message"], "client_token": conv["client_token"]}
        if self.admin_token:  # once per chat: the conversation's version is every reply's (sticky)
            message["model_version"] = self.version(cid)
        return message

    def version(self, conversation_id: str) -> str | None:
        """The model version the conversation is on, from the admin API (the public one does not say)."""
        conv = self.call(f"/admin/conversations/{conversation_id}", None, method="GET",
                         headers={"Authorization": f"Bearer {self.admin_token}"})
        return conv["model_version"]

    def rate(self, message: dict, rating: int) -> None:
        self.call(f"/api/messages/{message['id']}/feedback", {"rating": rating}, message["client_token"])


def drive(url: str, chats: int, rater: Rater | None = None, *, workers: int = 4, seed: int = 0,
          stop: threading.Event | None = None, qs: list[tuple[str, str]] | None = None,
          admin_token: str | None = None, summary: Summary | None = None) -> dict:
    """Run ``chats`` simulated conversations (``workers`` at a time) and rate each reply with ``rater``; stops early
    when ``stop`` is set. Returns the summary: chats, failed requests, and per model version chats/up/down (all
    under "unknown" without an admin token, see ``Client``). ``summary``: count into this one (read it while the
    chats go on; several calls may share it)."""
    summary, rater = summary or Summary(), rater or by_reference()
    client = Client(url, summary, admin_token=admin_token)
    if getattr(rater, "needs_version", False) and not client.admin_token:
        raise LookupError(NEEDS_ADMIN)  # before any chat: every one would fail the same way
    qs = qs or questions(max(chats, 1), seed)

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
            summary.add(message["model_version"] if "model_version" in message else UNKNOWN, rating)
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
