"""Text from files shown on a terminal: metadata, key names and paths can be hostile (escape sequences that clear
the screen or set the window title, newlines that forge output lines), so every string the CLI prints from a file
goes through `printable`."""

from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Cc: C0/C1 controls and DEL (ESC starts terminal sequences); Cf: invisible format characters such as the bidi
# overrides that reorder what is shown; Zl/Zp: Unicode line and paragraph separators.
_ESCAPED_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")


def printable(text: object, keep_newlines: bool = False) -> str:
    """`text` with every control or invisible format character written as an escape (`\\x1b`, `\\n`, `\\u202e`).

    keep_newlines: leave "\\n" as it is (for our own multi-line messages, whose parts are escaped already).
    """
    out = []
    for ch in str(text):
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif ch in _NAMED:
            out.append(_NAMED[ch])
        elif unicodedata.category(ch) in _ESCAPED_CATEGORIES:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)
