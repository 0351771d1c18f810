"""The prefix cache of a KV pool: full pages named by a hash chain, so that a request whose prompt starts with
tokens another request already computed reuses those pages instead of computing them again.

A page's name is ``hash(name of the page before it, the page's tokens)``, started from a salt that identifies
what the K/V depend on besides the tokens (the model's fingerprint, the KV dtype and scale, the page size). Two
pages share a name only if they hold the same tokens after the same prefix, for the same model: the K/V in them
are then the same (up to floating-point rounding between the code paths that computed them).

Only full pages whose K/V are completely written are ever named (:meth:`PrefixCache.insert`), and a named page is
never written again: a sequence that reuses it writes only into its own pages after it. The :class:`KVPool`
(:mod:`disagg.kv_pool`) owns the reference counts; this index keeps the names and, in least-recently-used order,
the named pages that no sequence references any more: they count as free, and the pool evicts the oldest when it
needs a page. Every operation is O(1) in the number of pages.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def chain_hashes(salt: bytes, tokens: Sequence[int], page_size: int, hashes: list[bytes]) -> list[bytes]:
    """Extend ``hashes`` (the names of the first len(hashes) full pages of ``tokens``) with the names of the
    remaining full pages of ``tokens``; returns ``hashes``. A partial last page gets no name."""
    prev = hashes[-1] if hashes else salt
    for start in range(len(hashes) * page_size, len(tokens) - page_size + 1, page_size):
        page = array("q", tokens[start : start + page_size]).tobytes()
        prev = hashlib.blake2b(prev + page, digest_size=16).digest()
        hashes.append(prev)
    return hashes


class PrefixCache:
    """Names of cached pages, and the unreferenced ones in least-recently-used order (see the module docstring)."""

    def __init__(self) -> None:
        self._page: dict[bytes, int] = {}  # name -> page
        self._name: dict[int, bytes] = {}  # page -> name
        self._idle: OrderedDict[int, None] = OrderedDict()  # named pages nobody references, oldest first

    def __len__(self) -> int:
        """Named pages (referenced or not)."""
        return len(self._page)

    @property
    def num_idle(self) -> int:
        """Named pages no sequence references: free to evict."""
        return len(self._idle)

    def idle_pages(self) -> list[int]:
        return list(self._idle)

    def lookup(self, name: bytes) -> int | None:
        return self._page.get(name)

    def is_named(self, page: int) -> bool:
        return page in self._name

    def insert(self, name: bytes, page: int) -> bool:
        """Name a fully written, referenced ``page``; False (nothing changes) when the name or the page already has
        one (two sequences computed the same page at once: the first one to finish keeps it)."""
        if name in self._page or page in self._name:
            return False
        self._page[name], self._name[page] = page, name
        return True

    def park(self, page: int) -> None:
        """The last reference to named ``page`` went away: it becomes the most recently used idle page."""
        self._idle[page] = None

    def take(self, page: int) -> None:
        """Named ``page`` is referenced again: it is no longer idle."""
        self._idle.pop(page, None)

    def evict(self) -> int:
        """Forget the least recently used idle page and return it (the caller reuses it)."""
        page, _ = self._idle.popitem(last=False)
        del self._page[self._name.pop(page)]
        return page

    def clear(self) -> list[int]:
        """Forget every name; returns the idle pages (now free). Referenced pages stay with their sequences."""
        idle = list(self._idle)
        self._page.clear()
        self._name.clear()
        self._idle.clear()
        return idle
