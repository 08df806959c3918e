"""Content repair: make a message fit for the next hop without changing what it says.

Run per copy in delivery, before signing. A 7-bit message whose lines fit (nearly every one)
costs one cheap scan and comes back as the same object. Otherwise the MIME structure is read
from the bytes (offsets only) and just the parts and header fields that need it are replaced:
    - a body part with a line over 998 octets, or 8-bit for a hop without 8BITMIME, is
      re-encoded: quoted-printable for mostly-ASCII text, base64 otherwise (never cut);
    - undeclared 8-bit text gets a charset parameter (see `_Charsets` for the order);
    - raw 8-bit header values in a message without SMTPUTF8 become RFC 2047 encoded-words
      (Subject and other free text, display names; never an address);
    - a header line over 998 octets is folded at whitespace, or encoded where it has none.
Everything else (other parts, boundaries, header fields) stays byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

from relay.policy.charsets import PLAUSIBLE, codec_name, detect

LIMIT = 998  # octets in a line, without its CRLF (RFC 5322 2.1.1)
MAX_DEPTH = 30  # nested multiparts deeper than this are left alone
LAST_RESORT = "windows-1252"
QP_MAX_8BIT = 1 / 6  # up to this share of 8-bit octets, quoted-printable is the smaller form

ADDRESS_FIELDS = frozenset({
    "from", "to", "cc", "bcc", "reply-to", "sender", "resent-from", "resent-to", "resent-cc",
    "resent-bcc", "resent-sender", "disposition-notification-to", "return-receipt-to"})
# Fields whose syntax has no room for encoded-words: only folded, never rewritten.
STRUCTURED_FIELDS = frozenset({
    "message-id", "in-reply-to", "references", "date", "received", "return-path",
    "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
    "content-id", "dkim-signature", "arc-seal", "arc-message-signature",
    "arc-authentication-results", "authentication-results", "received-spf", "list-id",
    "list-unsubscribe", "list-post", "resent-date", "resent-message-id"})
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
_ASCII_CHARSETS = frozenset({"us-ascii", "ascii", "ansi_x3.4-1968"})


def repair(data: bytes, *, eight_bit_ok: bool, smtputf8: bool,
           fallback_charset: str | None) -> bytes:
    """`data` made fit for a hop (`eight_bit_ok`: it announced 8BITMIME); the same object when
    nothing needs repair. `fallback_charset` is the sender's `charset`, for undeclared 8-bit
    text that is not UTF-8 and that detection is unsure about."""
    if data.isascii() and not has_long_line(data):
        return data
    return _Repair(data, eight_bit_ok, smtputf8, fallback_charset).run()


def needs_repair(data: bytes) -> bool:
    """Whether `repair` may change `data` (the fast path's test)."""
    return not data.isascii() or has_long_line(data)


def has_long_line(data: bytes, start: int = 0, end: int | None = None) -> bool:
    """Whether a line in data[start:end] is over 998 octets (a CR before the LF not counted).

    C-speed: from the last LF seen, one rfind finds the last LF within the next 1,000 octets,
    so runs of short lines are skipped ~1,000 octets a step (~200 steps for 200 KiB)."""
    end = len(data) if end is None else end
    rfind = data.rfind
    lf = start - 1  # a virtual LF before the start
    while True:
        # hot loop: an LF within the next 999 octets ends a line of at most 998 (CR included)
        while lf + LIMIT + 2 <= end:
            nxt = rfind(b"\n", lf + 1, lf + LIMIT + 2)
            if nxt < 0:
                break
            lf = nxt
        if lf + 1 >= end:
            return False
        nxt = data.find(b"\n", lf + 1, end)
        line_end = end if nxt < 0 else nxt
        if data[line_end - 1] == 13 and line_end > lf + 1:  # the CR of a CRLF
            line_end -= 1
        if line_end - (lf + 1) > LIMIT:
            return True
        if nxt < 0:
            return False
        lf = nxt


# ----------------------------------------------------------------------------- structure


@dataclass(slots=True)
class _Field:
    name: str    # lower case
    start: int   # absolute offsets in the message; the span includes the CRLF
    end: int


@dataclass(slots=True)
class _Entity:
    start: int
    header_end: int      # where the empty line starts: new fields go here
    body_start: int
    end: int
    fields: list[_Field]
    ctype: str           # "maintype/subtype", lower case
    params: dict[str, str]
    cte: str             # lower case, "" when absent
    children: list[_Entity] = field(default_factory=list)
    top: bool = False

    def get(self, name: str) -> _Field | None:
        return next((f for f in self.fields if f.name == name), None)


def _fields(data: bytes, start: int, end: int) -> list[_Field]:
    out: list[_Field] = []
    pos = start
    while pos < end:
        nl = data.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        if data[pos] in b" \t" and out:
            out[-1].end = line_end  # a folded continuation
        else:
            colon = data.find(b":", pos, line_end)
            name = data[pos:colon] if colon > 0 else b""
            out.append(_Field(name.strip().decode("latin-1").lower(), pos, line_end))
        pos = line_end
    return out


def _value(data: bytes, f: _Field) -> bytes:
    raw = data[f.start:f.end]
    return raw[raw.find(b":") + 1:]


def _unfold(value: bytes) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value.decode("latin-1")).strip()


def _content_type(text: str) -> tuple[str, dict[str, str]]:
    ctype = text.split(";", 1)[0].strip().lower()
    params = {}
    for name, value in _PARAM.findall(text):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[name.lower()] = value
    return ctype, params


def _parse(data: bytes, start: int, end: int, default: str, depth: int) -> _Entity:
    """The entity in data[start:end] with its parts (offsets only; nothing is copied)."""
    if data.startswith(b"\r\n", start):
        header_end, body_start = start, start + 2
    else:
        blank = data.find(b"\r\n\r\n", start, end)
        header_end, body_start = (end, end) if blank < 0 else (blank + 2, blank + 4)
    fields = _fields(data, start, header_end)
    ctype, params = default, {}
    ct = next((f for f in fields if f.name == "content-type"), None)
    if ct is not None:
        ctype, params = _content_type(_unfold(_value(data, ct)))
        if "/" not in ctype:
            ctype, params = default, {}
    cte_field = next((f for f in fields if f.name == "content-transfer-encoding"), None)
    cte = _unfold(_value(data, cte_field)).lower() if cte_field is not None else ""
    entity = _Entity(start, header_end, body_start, end, fields, ctype, params, cte,
                     top=depth == 0)
    if depth >= MAX_DEPTH or cte in ("base64", "quoted-printable"):
        return entity
    if ctype.startswith("multipart/") and params.get("boundary"):
        child_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        entity.children = [_parse(data, s, e, child_default, depth + 1)
                           for s, e in _parts(data, body_start, end, params["boundary"])]
    elif ctype in ("message/rfc822", "message/global"):
        inner = _parse(data, body_start, end, "text/plain", depth + 1)
        inner.top = True  # a message of its own: it gets a MIME-Version when it needs one
        entity.children = [inner]
    return entity


def _parts(data: bytes, start: int, end: int, boundary: str) -> Iterator[tuple[int, int]]:
    """Spans of the body parts between delimiter lines (the CRLF before one belongs to it)."""
    delimiter = re.compile(rb"\r\n--" + re.escape(boundary.encode("latin-1"))
                           + rb"(--)?[ \t]*(?=\r\n|\Z)")
    previous = None
    for match in delimiter.finditer(data, max(start - 2, 0), end):
        if previous is not None and previous.end() + 2 <= match.start():
            yield previous.end() + 2, match.start()
        if match.group(1):
            return
        previous = match


def _leaves(entity: _Entity) -> Iterator[_Entity]:
    if entity.children:
        for child in entity.children:
            yield from _leaves(child)
    else:
        yield entity


def _entities(entity: _Entity) -> Iterator[_Entity]:
    yield entity
    for child in entity.children:
        yield from _entities(child)


# ------------------------------------------------------------------------------- repair


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Charsets:
    """The charset of undeclared 8-bit text, in the contract's fixed order: a declared charset
    is trusted; valid UTF-8 is UTF-8; else the charset another part declares; else detection
    over all such text of the message (GB18030, Big5, the sender's charset), when sure; else
    the sender's charset; else detection's best guess when plausible; else windows-1252."""

    def __init__(self, root: _Entity, unknown: list[bytes], fallback: str | None) -> None:
        declared = [e.params["charset"].lower() for e in _entities(root)
                    if e.params.get("charset") and codec_name(e.params["charset"])
                    and e.params["charset"].lower() not in _ASCII_CHARSETS]
        self.other = declared[0] if declared else None
        self.unknown = unknown
        self.fallback = fallback if fallback and codec_name(fallback) else None
        self._decided: str | None = None

    def of(self, raw: bytes) -> str:
        if _is_utf8(raw):
            return "utf-8"
        return self._message_charset()

    def _message_charset(self) -> str:
        if self._decided is None:
            if self.other is not None:
                self._decided = self.other
            else:
                guess = detect(self.unknown, self.fallback)
                if guess.sure and guess.charset:
                    self._decided = guess.charset
                elif self.fallback:
                    self._decided = self.fallback
                elif guess.charset and guess.score >= PLAUSIBLE:
                    self._decided = guess.charset
                else:
                    # Not Chinese after all (European text without a charset, most often):
                    # the legacy default of Western mail clients, which decodes any octet
                    self._decided = LAST_RESORT
        return self._decided


class _Repair:
    def __init__(self, data: bytes, eight_bit_ok: bool, smtputf8: bool,
                 fallback: str | None) -> None:
        self.data = data
        self.eight_bit_ok = eight_bit_ok
        self.smtputf8 = smtputf8
        self.root = _parse(data, 0, len(data), "text/plain", 0)
        self.edits: list[tuple[int, int, bytes]] = []
        self.charsets = _Charsets(self.root, self._undeclared_text(), fallback)

    def run(self) -> bytes:
        for entity in _entities(self.root):
            for f in entity.fields:
                self._header(f)
            if entity.children:
                self._container(entity)
            else:
                self._leaf(entity)
        if not self.edits:
            return self.data
        return self._apply()

    # -- what needs a charset

    def _raw_body(self, leaf: _Entity) -> bytes | None:
        """The 8-bit body of a leaf that carries it unencoded, else None."""
        if leaf.cte in ("base64", "quoted-printable"):
            return None
        body = self.data[leaf.body_start:leaf.end]
        return None if body.isascii() else body

    def _undeclared(self, leaf: _Entity) -> bool:
        charset = leaf.params.get("charset", "").lower()
        return leaf.ctype.startswith("text/") and (not charset or charset in _ASCII_CHARSETS
                                                   or codec_name(charset) is None)

    def _undeclared_text(self) -> list[bytes]:
        pieces = []
        for leaf in _leaves(self.root):
            body = self._raw_body(leaf)
            if body is not None and self._undeclared(leaf) and not _is_utf8(body):
                pieces.append(body)
        for entity in _entities(self.root):
            for f in entity.fields:
                value = _value(self.data, f)
                if not value.isascii() and not _is_utf8(value):
                    pieces.append(value)
        return pieces

    # -- header fields

    def _header(self, f: _Field) -> None:
        raw = self.data[f.start:f.end]
        eight_bit = not raw.isascii() and not (self.smtputf8 and _is_utf8(raw))
        too_long = has_long_line(raw)
        if not eight_bit and not too_long:
            return
        colon = raw.find(b":")
        if colon < 0:
            return  # not a field (a stray line): leave it
        name, value = raw[:colon], raw[colon + 1:]
        if eight_bit and f.name in ("content-type", "content-disposition"):
            raw = _encode_params(raw, self.charsets)
        elif eight_bit and f.name not in STRUCTURED_FIELDS:
            text = _decode_value(value, self.charsets.of(value))
            new = _encode_addresses(text) if f.name in ADDRESS_FIELDS else encoded_words(text)
            raw = name + b": " + new + b"\r\n"
        folded = fold(raw)
        if folded is None and f.name in STRUCTURED_FIELDS:
            return  # no whitespace and no room for encoded-words: nothing better to send
        if folded is None:
            text = _decode_value(value, self.charsets.of(value))
            folded = name + b": " + encoded_words(text) + b"\r\n"
        if folded != self.data[f.start:f.end]:
            self.edits.append((f.start, f.end, folded))

    # -- bodies

    def _container(self, entity: _Entity) -> None:
        # A multipart or message/rfc822 can only be 7bit, 8bit or binary: once its parts are
        # re-encoded for a 7-bit hop, it says 7bit.
        if not self.eight_bit_ok and entity.cte in ("8bit", "binary"):
            self._set_field(entity, "content-transfer-encoding", b"7bit")

    def _leaf(self, leaf: _Entity) -> None:
        body = self.data[leaf.body_start:leaf.end]
        eight_bit = not body.isascii()
        reencode = has_long_line(self.data, leaf.body_start, leaf.end) or \
            (eight_bit and not self.eight_bit_ok)
        charset = None
        # RFC 6532: in an SMTPUTF8 message UTF-8 is at home; left alone unless re-encoded
        utf8_at_home = self.smtputf8 and not reencode and _is_utf8(body)
        if eight_bit and leaf.cte not in ("base64", "quoted-printable") and \
                self._undeclared(leaf) and not utf8_at_home:
            charset = self.charsets.of(body)
            self._set_charset(leaf, charset)
        if reencode and not leaf.ctype.startswith(("multipart/", "message/")):
            self._reencode(leaf, body)
        elif charset is not None and leaf.cte in ("", "7bit"):
            self._set_field(leaf, "content-transfer-encoding", b"8bit")

    def _reencode(self, leaf: _Entity, body: bytes) -> None:
        if leaf.cte == "base64":
            decoded = binascii.a2b_base64(body)
        elif leaf.cte == "quoted-printable":
            decoded = binascii.a2b_qp(body)
        else:
            decoded = body
        eight_bit_share = (len(decoded) - _ascii_count(decoded)) / max(len(decoded), 1)
        if _textual(leaf.ctype) and leaf.cte != "base64" and eight_bit_share <= QP_MAX_8BIT:
            cte, encoded = b"quoted-printable", binascii.b2a_qp(decoded, istext=True)
        else:
            cte, encoded = b"base64", base64.encodebytes(decoded).replace(b"\n", b"\r\n")
        if not body.endswith(b"\r\n"):
            encoded = encoded.removesuffix(b"\r\n")
        elif not encoded.endswith(b"\r\n"):
            encoded += b"\r\n"
        self.edits.append((leaf.body_start, leaf.end, encoded))
        self._set_field(leaf, "content-transfer-encoding", cte)

    # -- field edits

    def _set_field(self, entity: _Entity, name: str, value: bytes) -> None:
        current = entity.get(name)
        canonical = "-".join(w.capitalize() for w in name.split("-")).encode()
        new = canonical + b": " + value + b"\r\n"
        if current is not None:
            self._replace(current, new)
        else:
            self._insert(entity, new)

    def _set_charset(self, leaf: _Entity, charset: str) -> None:
        param = b'charset="' + charset.encode("ascii") + b'"'
        ct = leaf.get("content-type")
        if ct is None:
            if leaf.top and leaf.get("mime-version") is None:
                self._insert(leaf, b"MIME-Version: 1.0\r\n")
            self._insert(leaf, b"Content-Type: " + leaf.ctype.encode() + b"; " + param + b"\r\n")
            return
        raw = self.data[ct.start:ct.end]
        replaced, n = re.subn(rb'(?i)(;\s*)charset\s*=\s*("[^"]*"|[^;\s]*)',
                              lambda m: m.group(1) + param, raw, count=1)
        self._replace(ct, replaced if n else raw.rstrip(b"\r\n") + b";\r\n " + param + b"\r\n")

    def _replace(self, f: _Field, new: bytes) -> None:
        # A field may already be rewritten (folded or encoded): the last edit of a span wins.
        self.edits = [e for e in self.edits if (e[0], e[1]) != (f.start, f.end)]
        self.edits.append((f.start, f.end, new))

    def _insert(self, entity: _Entity, new: bytes) -> None:
        self.edits.append((entity.header_end, entity.header_end, new))

    def _apply(self) -> bytes:
        out, pos = [], 0
        # insertions at one offset keep their order; a replaced span sorts before them
        for start, end, new in sorted(self.edits, key=lambda e: (e[0], e[1] > e[0])):
            out.append(self.data[pos:start])
            out.append(new)
            pos = max(pos, end)
        out.append(self.data[pos:])
        return b"".join(out)


def _textual(ctype: str) -> bool:
    """Lines of text a person may read (e-invoice XML included): worth quoted-printable."""
    return ctype.startswith("text/") or ctype in ("application/xml", "application/json") \
        or ctype.endswith("+xml")


_RAW_PARAM = re.compile(rb'(;\s*)([!#-\'*+.0-9A-Z^-~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


def _encode_params(raw: bytes, charsets: _Charsets) -> bytes:
    """8-bit parameter values (a file name) as RFC 2231 `name*=utf-8''%XX...`."""
    def encode(match: re.Match[bytes]) -> bytes:
        value = match.group(3)
        if value.isascii():
            return match.group(0)
        if value.startswith(b'"'):
            value = re.sub(rb"\\(.)", rb"\1", value[1:-1])
        text = value.decode(codec_name(charsets.of(value)) or "latin-1", "replace")
        quoted = urllib.parse.quote(text.encode("utf-8"), safe="")
        return match.group(1) + match.group(2) + b"*=utf-8''" + quoted.encode("ascii")

    return _RAW_PARAM.sub(encode, raw)


def _ascii_count(data: bytes) -> int:
    return len(data) - len(data.translate(None, bytes(range(128))))


def _decode_value(value: bytes, charset: str) -> str:
    codec = codec_name(charset) or "latin-1"
    text = value.decode(codec, "replace")
    return re.sub(r"\r?\n(?=[ \t])", "", text).strip()


# ------------------------------------------------------------------- header encoding


def encoded_words(text: str, charset: str = "utf-8") -> bytes:
    """RFC 2047 B encoded-words of at most 75 characters, folded with CRLF SP; a reader joins
    adjacent words without the space between them, so the text comes back exactly."""
    words: list[bytes] = []
    chunk = ""
    room = 75 - len(f"=?{charset}?B??=")
    for ch in text:
        candidate = chunk + ch
        if len(candidate.encode(charset)) > room // 4 * 3 and chunk:
            words.append(_word(chunk, charset))
            candidate = ch
        chunk = candidate
    if chunk or not words:
        words.append(_word(chunk, charset))
    return b"\r\n ".join(words)


def _word(text: str, charset: str) -> bytes:
    return f"=?{charset}?B?".encode() + base64.b64encode(text.encode(charset)) + b"?="


def _split_addresses(text: str) -> list[str]:
    """Split an address list at the commas outside quotes, <> and comments."""
    items, current, depth, quoted, angle, escaped = [], [], 0, False, False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif ch in "<>" and not depth:
            angle = ch == "<"
        elif ch == "," and not depth and not angle:
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    items.append("".join(current))
    return items


def _encode_addresses(text: str) -> bytes:
    """Display names with non-ASCII text become encoded-words; addresses stay as they are."""
    out = []
    for item in _split_addresses(text):
        match = re.fullmatch(r"\s*(.*?)\s*(<[^>]*>)\s*", item, re.S)
        if match is None or match.group(1).isascii():
            out.append(item.strip().encode("utf-8"))
            continue
        name = match.group(1)
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = re.sub(r"\\(.)", r"\1", name[1:-1])
        out.append(encoded_words(name) + b" " + match.group(2).encode("utf-8"))
    return b",\r\n ".join(out)


def fold(field_bytes: bytes) -> bytes | None:
    """The field with every line over 998 octets folded before a space or tab (unchanged when
    all fit); None when a line has no whitespace to fold at."""
    if not has_long_line(field_bytes):
        return field_bytes
    lines = []
    for line in field_bytes.removesuffix(b"\r\n").split(b"\r\n"):
        while len(line) > LIMIT:
            cut = max(line.rfind(b" ", 1, LIMIT + 1), line.rfind(b"\t", 1, LIMIT + 1))
            if cut <= 0 or not line[:cut].strip():
                return None
            lines.append(line[:cut])
            line = line[cut:]
        lines.append(line)
    return b"\r\n".join(lines) + b"\r\n"
