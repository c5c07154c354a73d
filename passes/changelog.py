"""What each pass changed (counts and layer names), collected for the compile report."""
from __future__ import annotations

import contextlib
import contextvars
import logging

log = logging.getLogger("shrinkc.passes")
_ACTIVE: contextvars.ContextVar["ChangeLog | None"] = contextvars.ContextVar("shrinkc_changelog", default=None)


class ChangeLog:
    """Per pass: a list of {"what": ..., "layer": ..., **details} entries and skip reasons."""

    def __init__(self):
        self.entries: dict[str, list[dict]] = {}
        self.skipped: dict[str, list[dict]] = {}

    def summary(self) -> dict:
        out = {}
        for name in sorted(set(self.entries) | set(self.skipped)):
            changes = self.entries.get(name, [])
            counts: dict[str, int] = {}
            for c in changes:
                counts[c["what"]] = counts.get(c["what"], 0) + 1
            out[name] = {"counts": counts, "changes": changes}
            if self.skipped.get(name):
                out[name]["skipped"] = self.skipped[name]
        return out


@contextlib.contextmanager
def collecting():
    logbook = ChangeLog()
    token = _ACTIVE.set(logbook)
    try:
        yield logbook
    finally:
        _ACTIVE.reset(token)


def record(pass_name: str, what: str, layer: str = "", **details) -> None:
    """Note one change a pass made, e.g. record("FoldScaleIntoConv", "folded", "block3.expand")."""
    book = _ACTIVE.get()
    if book is not None:
        book.entries.setdefault(pass_name, []).append({"what": what, "layer": layer, **details})


def skip(pass_name: str, layer: str, why: str) -> None:
    """Note where a pass declined and why (also logged, as the style guide asks)."""
    log.info("%s skipped %s: %s", pass_name, layer, why)
    book = _ACTIVE.get()
    if book is not None:
        book.skipped.setdefault(pass_name, []).append({"layer": layer, "why": why})


def retract(since: dict[str, int], why: str) -> None:
    """Turn the changes recorded after `since = checkpoint()[0]` into skips saying `why` (the rewrite was undone)."""
    book = _ACTIVE.get()
    if book is None:
        return
    for name, items in book.entries.items():
        undone, book.entries[name] = items[since.get(name, 0):], items[:since.get(name, 0)]
        for c in undone:
            book.skipped.setdefault(name, []).append({"layer": c.get("layer", ""), "why": why, "undone": c})


def checkpoint() -> tuple[dict[str, int], dict[str, int]]:
    """How many changes and skips each pass has recorded so far (to cut() what a trial rewrite recorded)."""
    book = _ACTIVE.get()
    if book is None:
        return {}, {}
    return ({name: len(items) for name, items in book.entries.items()},
            {name: len(items) for name, items in book.skipped.items()})


def cut(since: tuple[dict[str, int], dict[str, int]]) -> tuple[dict, dict]:
    """Take out of the book what was recorded after `since = checkpoint()`, to paste() back or leave out
    (one of several trial rewrites, of which only one is kept)."""
    book = _ACTIVE.get()
    if book is None:
        return {}, {}
    taken: tuple[dict, dict] = ({}, {})
    for part, counts, store in ((book.entries, since[0], taken[0]), (book.skipped, since[1], taken[1])):
        for name, items in part.items():
            store[name], part[name] = items[counts.get(name, 0):], items[:counts.get(name, 0)]
    return taken


def paste(taken: tuple[dict, dict]) -> None:
    """Put back what cut() took out."""
    book = _ACTIVE.get()
    if book is None:
        return
    for part, store in ((book.entries, taken[0]), (book.skipped, taken[1])):
        for name, items in store.items():
            part.setdefault(name, []).extend(items)
