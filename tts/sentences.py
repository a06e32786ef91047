"""Split text into sentence-sized pieces for streaming synthesis.

Backends synthesise one piece at a time, so the first piece decides how soon the avatar
starts speaking: it is kept short where the text allows.
"""
from __future__ import annotations

import re

# Western sentence ends count only when followed by whitespace or the end of the text,
# which keeps "3.14", "e.g.x", "example.com" and "v1.2" whole. Closing quotes and
# brackets stay with the sentence they close. CJK text has no spaces, so its marks
# always end a sentence. Newlines always do.
_BOUNDARY = re.compile(
    r"[.!?;…]+[\"'”’)\]]*(?=\s|$)"
    r"|[。！？；]+[」』”’）)\"']*"
    r"|\n+"
)

# Lower-cased words that a period follows without ending the sentence.
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "etc", "e.g", "i.e"}
)
_LAST_WORD = re.compile(r"(\S+)$")
_LEADING_PUNCT = "\"'“‘([{"

# Where an over-long piece may be cut, best first: after a clause mark, then at a space.
_CLAUSE_MARKS = ",，、:：—"

# The first piece is cut at the first comma past this many characters, if it is longer
# than FIRST_PIECE_LONG: the first audio is ready sooner and the cut falls at a pause.
FIRST_PIECE_MIN = 40
FIRST_PIECE_LONG = 80


def split_sentences(text: str, max_chars: int = 200) -> list[str]:
    """Split ``text`` into stripped, non-empty pieces of at most ``max_chars``
    characters, cut at sentence ends (keeping their punctuation), then at clause marks,
    then at spaces. The first piece is kept short when the text allows."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    pieces: list[str] = []
    for sentence in _sentences(text):
        pieces.extend(_split_long(sentence, max_chars))
    if pieces:
        pieces[:1] = _shorten_first(pieces[0])
    return pieces


def _sentences(text: str) -> list[str]:
    out: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if match.group() == "." and _ends_with_abbreviation(text[start : match.start()]):
            continue
        out.append(text[start : match.end()].strip())
        start = match.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def _ends_with_abbreviation(before_period: str) -> bool:
    match = _LAST_WORD.search(before_period)
    if match is None:
        return False
    return match.group(1).lstrip(_LEADING_PUNCT).lower() in _ABBREVIATIONS


def _split_long(piece: str, max_chars: int) -> list[str]:
    out: list[str] = []
    while len(piece) > max_chars:
        cut = _cut_point(piece, max_chars)
        head, piece = piece[:cut].strip(), piece[cut:].strip()
        if head:
            out.append(head)
    if piece:
        out.append(piece)
    return out


def clause_break(text: str, i: int) -> bool:
    """``text[i]`` ends a clause: a clause mark, and for the Latin ones (``,`` ``:``) followed
    by a space or the end, so "12,500,000" and "3:30" are never cut."""
    if text[i] not in _CLAUSE_MARKS:
        return False
    return text[i] not in ",:" or i + 1 >= len(text) or text[i + 1].isspace()


def _cut_point(piece: str, max_chars: int) -> int:
    """Index to cut ``piece`` at so the head has at most ``max_chars`` characters."""
    window = piece[: max_chars + 1]
    # A clause cut that leaves a tiny head is worse than a cut at a space.
    clause = next((i for i in range(min(max_chars, len(window)) - 1, -1, -1) if clause_break(window, i)), -1)
    if clause >= 0 and clause + 1 >= max(1, max_chars // 3):
        return clause + 1
    space = window.rfind(" ")
    if space > 0:
        return space
    return max_chars  # no break at all (a URL, unpunctuated CJK): cut hard


def _shorten_first(piece: str) -> list[str]:
    if len(piece) <= FIRST_PIECE_LONG:
        return [piece]
    for i in range(FIRST_PIECE_MIN, len(piece) - 1):
        if piece[i] in ",，、" and clause_break(piece, i):
            head, tail = piece[: i + 1].strip(), piece[i + 1 :].strip()
            return [head, tail] if tail else [head]
    return [piece]
