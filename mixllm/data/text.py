"""Item text: the one rendering of an item that both the textual teacher and the item text encoder read."""

from __future__ import annotations

from collections.abc import Iterable


def item_text(title: str, genres: Iterable[str]) -> str:
    """Render an item as ``"{title}; genres: {g1, g2}"``.

    The title keeps whatever the catalog puts in it (MovieLens titles end with the release year,
    e.g. ``"Toy Story (1995)"``); surrounding whitespace is stripped. Genres are joined with
    ``", "`` in the order given. An item without genres renders as ``"{title}; genres: none"`` so
    the format never changes shape.

    >>> item_text("Toy Story (1995)", ["Animation", "Children's", "Comedy"])
    "Toy Story (1995); genres: Animation, Children's, Comedy"
    """
    genre_list = [g.strip() for g in genres if g and g.strip()]
    return f"{title.strip()}; genres: {', '.join(genre_list) if genre_list else 'none'}"
