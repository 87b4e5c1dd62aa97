"""What the chat service serves: the plan (champion, maybe a candidate) and the pair swapped in on reload, plus the
sticky draw that sends a conversation to the canary. Pure: no Flask, no model code."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One model the service should serve: its arm, where to load it from and, for a registry version, which one."""

    arm: str  # "champion" or "candidate"
    uri: str | None
    version: str | None = None  # known before loading for registry versions: a loaded one is reused
    name: str | None = None
    share: float = 0.0  # the candidate's share of new conversations


@dataclass(frozen=True)
class Serving:
    """What is served, swapped in one assignment: a request sees the old or the new pair, never half of each."""

    champion: object = None  # engine.ModelHandle
    candidate: object = None
    share: float = 0.0


def fixed_plan(cfg, uri: str | None = None) -> list[Target]:
    """The plan of a service built with its own loader (tests, tools): one model, the loader's default."""
    return [Target("champion", uri)]


def canary_arm(conversation_id: str, share: float) -> bool:
    """True when the conversation goes to the candidate: a uniform draw from the (random) id, so the same id always
    lands on the same side and a share of s sends a fraction s of new conversations."""
    draw = int.from_bytes(hashlib.sha256(conversation_id.encode()).digest()[:8], "big") / 2**64
    return draw < share
