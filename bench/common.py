"""What the bench scripts share."""
from __future__ import annotations

import os


def put_section(path: str, section: str, begin: str, end: str) -> None:
    """Replace one bench's section of latest.md (between its markers `begin` and `end`), or
    append it; the rest of the file stays as it is."""
    text = open(path).read() if os.path.exists(path) else ""
    if begin in text and end in text:
        i, j = text.index(begin), text.index(end) + len(end)
        text = text[:i] + section.rstrip("\n") + text[j:]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    with open(path + ".tmp", "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(path + ".tmp", path)
