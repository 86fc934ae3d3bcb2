"""Group commit (``jobs/store/group_commit.py``): when writes go alone, when together.

The senders here stand for the database: each call is one statement, and the test holds a
statement "in flight" until it lets it land, to make writes meet deterministically."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from aiserver.jobs.store.group_commit import MAX_GROUP, GroupCommit


class Database:
    """Records the statements: ("one", item) or ("group", items); fails items in ``bad``."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, list[str]]] = []
        self.gate: asyncio.Event | None = None
        self.bad: set[str] = set()

    async def one(self, item: str) -> str:
        self.statements.append(("one", [item]))
        if self.gate is not None:
            await self.gate.wait()
        if item in self.bad:
            raise ValueError(item)
        return f"stored {item}"

    async def group(self, items: Sequence[str]) -> list[str]:
        self.statements.append(("group", list(items)))
        if self.bad & set(items):
            raise ValueError("the statement failed")
        return [f"stored {i}" for i in items]


def _commit(db: Database) -> GroupCommit[str, str]:
    return GroupCommit(db.one, db.group, key=lambda item: item.split("/")[0])


async def _meet(db: Database, commit: GroupCommit[str, str], items: list[str]) -> list[object]:
    """The first item in flight (held), the others arriving meanwhile; then all land."""
    db.gate = asyncio.Event()
    first = asyncio.create_task(commit.write(items[0]))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(commit.write(i)) for i in items[1:]]
    await asyncio.sleep(0)
    db.gate.set()
    db.gate = None
    return list(await asyncio.gather(first, *rest, return_exceptions=True))


async def test_a_write_alone_goes_at_once_by_itself() -> None:
    db = Database()
    commit = _commit(db)
    assert await commit.write("a") == "stored a"
    assert await commit.write("b") == "stored b"
    assert db.statements == [("one", ["a"]), ("one", ["b"])]
    assert commit.grouped == 0


async def test_writes_arriving_during_a_flight_go_together_in_one_statement() -> None:
    db = Database()
    commit = _commit(db)
    results = await _meet(db, commit, ["a", "b", "c", "d"])
    assert results == ["stored a", "stored b", "stored c", "stored d"]
    assert db.statements == [("one", ["a"]), ("group", ["b", "c", "d"])]
    assert commit.grouped == 3
    assert await commit.write("e") == "stored e"  # idle again: alone
    assert db.statements[-1] == ("one", ["e"])


async def test_one_key_is_never_twice_in_a_group_and_keeps_its_order() -> None:
    db = Database()
    commit = _commit(db)
    await _meet(db, commit, ["a/1", "b/1", "b/2", "c/1", "b/3"])
    assert db.statements == [
        ("one", ["a/1"]),
        ("group", ["b/1", "c/1"]),
        ("one", ["b/2"]),  # the next flight: what waited, in arrival order
        ("one", ["b/3"]),
    ]


async def test_a_failed_group_is_retried_write_by_write_each_error_its_own() -> None:
    db = Database()
    db.bad = {"c"}
    commit = _commit(db)
    results = await _meet(db, commit, ["a", "b", "c", "d"])
    assert results[:2] == ["stored a", "stored b"] and results[3] == "stored d"
    assert isinstance(results[2], ValueError) and str(results[2]) == "c"
    assert db.statements[1] == ("group", ["b", "c", "d"])
    assert sorted(s for _, (s,) in db.statements[2:]) == ["b", "c", "d"]
    assert commit.grouped == 0


async def test_groups_are_bounded() -> None:
    db = Database()
    commit = _commit(db)
    items = [f"j{i}" for i in range(MAX_GROUP + 6)]
    assert await _meet(db, commit, items) == [f"stored {i}" for i in items]
    sizes = [len(batch) for kind, batch in db.statements if kind == "group"]
    assert sizes == [MAX_GROUP, 5]


async def test_a_caller_that_gives_up_does_not_stop_the_others() -> None:
    db = Database()
    commit = _commit(db)
    db.gate = asyncio.Event()
    first = asyncio.create_task(commit.write("a"))
    await asyncio.sleep(0)
    quitter = asyncio.create_task(commit.write("b"))
    stayer = asyncio.create_task(commit.write("c"))
    await asyncio.sleep(0)
    quitter.cancel()
    db.gate.set()
    db.gate = None
    assert await first == "stored a"
    assert await stayer == "stored c"
    with pytest.raises(asyncio.CancelledError):
        await quitter
    assert await commit.write("d") == "stored d"  # not left busy
