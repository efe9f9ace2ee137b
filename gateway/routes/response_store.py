"""The stored responses behind `store`, `previous_response_id` and GET / DELETE
/v1/responses/{id}: in memory, bounded by count, least recently used evicted first.

Each entry keeps its Response object and only its own turn as chat messages (the input it
was sent and the output it produced), with a link to the response it continued; a chain's
history is rebuilt by following the links, so a long conversation costs memory once, not
once per turn. Using a response (a GET, or a turn that continues it) refreshes it and every
response before it in its chain, so a conversation in use is not evicted from under itself.
A chain with a missing link (evicted or deleted) is an error that says so. Nothing survives
a gateway restart.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mlx_gw.gateway.errors import BadRequest, NotFound

MAX_STORED_RESPONSES = 1000


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    previous_id: str | None
    messages: list[dict[str, Any]]  # this turn's input, then its output


class ResponseStore:
    def __init__(self, capacity: int = MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: Stored) -> None:
        rid = entry.response["id"]
        self._entries[rid] = entry
        self._entries.move_to_end(rid)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, rid: str) -> dict[str, Any]:
        entry = self._entries.get(rid)
        if entry is None:
            raise NotFound(f"No stored response with id '{rid}' (it was never stored, was "
                           "deleted, or was evicted: this gateway keeps the last "
                           f"{self.capacity})", code="response_not_found")
        self._entries.move_to_end(rid)
        return entry.response

    def delete(self, rid: str) -> None:
        if self._entries.pop(rid, None) is None:
            raise NotFound(f"No stored response with id '{rid}'", code="response_not_found")

    def history(self, rid: str) -> list[dict[str, Any]]:
        """The chat messages of the chain that ends with response `rid`, oldest first."""
        turns: list[list[dict[str, Any]]] = []
        seen: set[str] = set()
        current: str | None = rid
        while current is not None and current not in seen:
            seen.add(current)
            entry = self._entries.get(current)
            if entry is None:
                which = "" if current == rid else f" (it continues '{current}', which is gone)"
                raise BadRequest(f"Previous response '{rid}' cannot be continued{which}: "
                                 "responses are kept in memory, the last "
                                 f"{self.capacity}, and only with store: true",
                                 code="previous_response_not_found",
                                 param="previous_response_id")
            self._entries.move_to_end(current)
            turns.append(entry.messages)
            current = entry.previous_id
        return [m for turn in reversed(turns) for m in turn]


RESPONSE_STORE: web.AppKey[ResponseStore] = web.AppKey("response_store", ResponseStore)


def install(app: web.Application) -> ResponseStore:
    store = app[RESPONSE_STORE] = ResponseStore()
    return store
