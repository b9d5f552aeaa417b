"""Paged lists, the same way in every service: keyset pages in the store, opaque tokens.

A store returns at most `page_size` items after the last one the client saw (by the list's sort
key, never an offset: items added or removed between pages neither repeat nor vanish) and a
`next_token` naming the last item of the page, empty on the last page. Tokens are opaque to
clients ("pass next_page_token unchanged"): a versioned, base64 wrapper of the sort key.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tunedock.errors import InvalidArgument

T = TypeVar("T")
MAX_PAGE_SIZE = 1000
"""Largest page of a list (a bigger page_size is cut to it)."""
DEFAULT_PAGE_SIZE = 50


@dataclass
class Page(Generic[T]):
    items: list[T] = field(default_factory=list)
    next_token: str = ""


def page_size(size: int) -> int:
    if size < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {size}")
    return min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(value: str) -> str:
    return base64.urlsafe_b64encode(f"p1:{value}".encode()).decode()


def token_after(created_at_iso: str, item_id: str) -> str:
    """The token of a page that starts after the item created at `created_at_iso` with id `item_id`
    (lists sorted newest first by (created_at, id)): what OpenAI-style `after=<id>` cursors turn into."""
    return encode_token(f"{created_at_iso}|{item_id}")


def decode_token(token: str) -> str:
    """The sort key a token names ("" for the first page); InvalidArgument for a token not issued here."""
    if not token:
        return ""
    try:
        decoded = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        decoded = ""
    if not decoded.startswith("p1:") or len(decoded) == 3:
        raise bad_token()
    return decoded[3:]


def bad_token() -> InvalidArgument:
    return InvalidArgument("page_token is not one this server issued; pass next_page_token unchanged")
