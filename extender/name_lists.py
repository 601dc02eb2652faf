"""Repeated `NodeNames` arrays, recognised by their bytes instead of decoded again.

kube-scheduler sends every pod's filter the same candidate list (all 5,000 names on a large
cluster) and sends prioritize the very list filter answered. Decoding and type-checking those
strings, then comparing them name by name with the list they repeat, was a fifth of a
5,000-name pair. `split_names` cuts the array out of the body as raw bytes; `NameListCache`
maps those bytes to the list decoded the first time, so a repeat costs one hash and one memcmp
and hands back the very same list object (whose items then compare by identity downstream).

The cut is trusted only where it is provably the top-level `NodeNames` value: the rest of the
body, with the array replaced by `null`, must parse with `NodeNames` null, and the array must
be the last member of the outermost object (`"NodeNames":[...]` then only `}`: the order Go's
encoder writes ExtenderArgs in). Anything else takes the ordinary parse."""

from __future__ import annotations

import threading
from collections import OrderedDict

_KEY = b'"NodeNames":['
_JSON_SPACE = b" \t\r\n"


def split_names(body: bytes) -> tuple[bytes, bytes] | None:
    """(body with the NodeNames array replaced by null, the array's bytes), or None where
    the body does not end in `"NodeNames":[...]}`. The caller checks that the replaced body
    parses with a top-level NodeNames of null before it trusts the cut."""
    k = body.rfind(_KEY)
    if k <= 0 or body[k - 1] == 0x5C:  # an escaped quote: the key is inside another string
        return None
    end = body.rfind(b"]")
    if end < k or body[end + 1:].strip(_JSON_SPACE) != b"}":
        return None
    start = k + len(_KEY) - 1
    return body[:start] + b"null" + body[end + 1:], body[start:end + 1]


class NameListCache:
    """The last few NodeNames arrays: raw bytes -> the list they decode to. The lists are
    shared between requests, so nobody downstream may change one."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._lists: OrderedDict[bytes, list[str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, raw: bytes) -> list[str] | None:
        with self._lock:
            hit = self._lists.get(raw)
            if hit is not None:
                self._lists.move_to_end(raw)
            return hit

    def put(self, raw: bytes, names: list[str]) -> None:
        with self._lock:
            self._lists[raw] = names
            self._lists.move_to_end(raw)
            while len(self._lists) > self.size:
                self._lists.popitem(last=False)

    def __len__(self) -> int:
        return len(self._lists)
