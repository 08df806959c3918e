"""Which charset undeclared 8-bit text is in, among a few candidates: decode and score.

Invoices from Chinese systems come in UTF-8, GBK/GB18030 or Big5 without saying which. A general
detector (charset-normalizer) guesses from byte statistics and mislabels short GBK text (a
two-character subject) as Big5 or Korean. Here each candidate must decode every piece strictly,
and then the decoded characters are scored by how common they are in that candidate's own
script: GB2312 level 1 holds the 3,755 most used simplified characters, Big5 level 1 the 5,401
most used traditional ones. GBK bytes read as Big5 land on kana and level-2 rarities; Big5 bytes
read as GB18030 land on kana, Greek, Cyrillic and private-use code points.
"""

from __future__ import annotations

import codecs
import functools
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

GB, BIG5 = "gb18030", "big5"
_FAMILY = {"gb18030": GB, "gbk": GB, "gb2312": GB, "euc_cn": GB, "hz": GB,
           "big5": BIG5, "cp950": BIG5, "big5hkscs": BIG5}
SURE = 0.75     # the best candidate scores at least this ...
MARGIN = 0.15   # ... and this much above the runner-up
PLAUSIBLE = 0.5  # below this even the best candidate is likely wrong (Latin-1 read as GBK)


@dataclass(frozen=True, slots=True)
class Guess:
    charset: str | None   # None: no candidate decodes the text
    sure: bool
    score: float = 0.0    # share of plausible characters with that charset (0..1)


def codec_name(charset: str) -> str | None:
    """Python's canonical codec name for a MIME charset label, or None when unknown."""
    try:
        return codecs.lookup(charset.strip().strip('"').lower()).name
    except LookupError:
        return None


def family(charset: str) -> str:
    name = codec_name(charset) or charset
    return _FAMILY.get(name.replace("-", "_"), name)


def _pairs(lead: range, trail: range, codec: str) -> frozenset[str]:
    chars = set()
    for hi in lead:
        for lo in trail:
            try:
                chars.add(bytes((hi, lo)).decode(codec))
            except UnicodeDecodeError:
                continue
    return frozenset(chars)


@functools.cache
def _tables() -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """(common, less common) characters per script, derived from the codecs once (~10 ms)."""
    # A440..C67E; row C6 also holds kana after C67E, which no Chinese text is made of
    big5_level1 = frozenset(c for c in _pairs(range(0xA4, 0xC7), range(0x40, 0xFF), BIG5)
                            if "\u4e00" <= c <= "\u9fff")
    big5_all = _pairs(range(0xC9, 0xFA), range(0x40, 0xFF), BIG5) | big5_level1
    gb_level1 = _pairs(range(0xB0, 0xD8), range(0xA1, 0xFF), "gb2312")
    gb_all = _pairs(range(0xB0, 0xF8), range(0xA1, 0xFF), "gb2312")
    return {GB: (gb_level1, gb_all), BIG5: (big5_level1, big5_all)}


def ready() -> bool:
    """Whether the tables are built (building them takes tens of ms, once per process)."""
    return _tables.cache_info().currsize > 0


def warm() -> None:
    _tables()


def _is_punctuation(ch: str) -> bool:
    # CJK symbols and punctuation, full-width forms, general punctuation
    return "\u3000" <= ch <= "\u303f" or "\uff00" <= ch <= "\uffef" or "\u2010" <= ch <= "\u205e"


def _score(text: str, script: str) -> float:
    """Share of the non-ASCII characters that are plausible in `script` (0..1)."""
    tables = _tables().get(script)
    total = points = 0.0
    for ch in text:
        if ch < "\x80":
            continue
        total += 1
        if _is_punctuation(ch):
            points += 1
        elif tables is not None:
            common, known = tables
            if ch in common:
                points += 1
            elif ch in known:
                points += 0.5
            elif "\u4e00" <= ch <= "\u9fff":
                points += 0.2
        elif ch.isalpha() or unicodedata.category(ch).startswith(("P", "S", "Z", "N")):
            points += 1
    return points / total if total else 1.0


def detect(pieces: Sequence[bytes], extra: str | None = None) -> Guess:
    """The charset of all `pieces` together, among GB18030, Big5 and `extra`."""
    candidates = [GB, BIG5]
    if extra is not None and family(extra) not in candidates and codec_name(extra):
        candidates.append(codec_name(extra) or extra)
    scores: list[tuple[float, str]] = []
    for charset in candidates:
        try:
            text = "".join(piece.decode(charset) for piece in pieces)
        except UnicodeDecodeError:
            continue
        scores.append((_score(text, family(charset)), charset))
    if not scores:
        return Guess(None, False)
    scores.sort(key=lambda s: -s[0])  # stable: GB18030 wins a tie, then Big5
    best, charset = scores[0]
    runner_up = scores[1][0] if len(scores) > 1 else 0.0
    return Guess(charset, best >= SURE and best - runner_up >= MARGIN, best)
