"""Names for containers created without one, as Docker makes them: ``adjective_surname``.

A generated name must be a valid container name (:data:`portmesh.model.validation.NAME_RE`),
free in the current state, and never derived from the request (Docker's habit, and a
command's first word -- ``python3``, ``sh`` -- says nothing about the container). The
surnames honour scientists and engineers of networking and computing, as Docker's do.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container

ADJECTIVES = (
    "agile", "amazing", "bold", "brave", "bright", "busy", "calm", "careful", "clever", "cool",
    "crisp", "curious", "daring", "eager", "elated", "epic", "fervent", "festive", "focused", "friendly",
    "gallant", "gentle", "happy", "hardcore", "humble", "jolly", "keen", "kind", "lucid", "merry",
    "modest", "nifty", "noble", "patient", "plucky", "practical", "quick", "quiet", "relaxed", "serene",
    "sharp", "steady", "stoic", "sturdy", "swift", "tender", "tidy", "upbeat", "vibrant", "zealous",
)  # fmt: skip

SURNAMES = (
    "baran", "bartik", "berners_lee", "borg", "cerf", "clark", "conway", "corbato", "davies", "dijkstra",
    "estrin", "floyd", "hamilton", "hinden", "hopper", "jacobson", "kahn", "karp", "kleinrock", "knuth",
    "lamport", "lampson", "liskov", "lovelace", "metcalfe", "mockapetris", "moy", "nagle", "needham", "perlman",
    "pike", "postel", "rabin", "ritchie", "saltzer", "shamir", "shannon", "sutherland", "tanenbaum", "thompson",
    "torvalds", "turing", "varghese", "wing", "wirth", "yao", "zhang", "zimmermann", "lynch", "mccanne",
)  # fmt: skip


def generate_name(taken: Container[str], rng: Callable[[int], int] | None = None, attempts: int = 100) -> str:
    """A free ``adjective_surname`` (Docker's form); after ``attempts`` collisions a digit is appended, as Docker does.

    ``rng(n)`` returns an integer in ``[0, n)`` (tests pass a deterministic one).
    """
    pick = rng if rng is not None else random.SystemRandom().randrange
    for attempt in range(attempts * 2):
        name = f"{ADJECTIVES[pick(len(ADJECTIVES))]}_{SURNAMES[pick(len(SURNAMES))]}"
        if attempt >= attempts:
            name += str(pick(10))
        if name not in taken:
            return name
    raise RuntimeError("no free generated name after many attempts; give the container a name")
