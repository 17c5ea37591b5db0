"""The generated sections of docs/results.md: text between a pair of HTML comment markers."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, begin: str, end: str, text: str) -> None:
    """Replace what lies between ``begin`` and ``end`` in ``path`` (or append it), atomically.

    The rest of the file is left alone; a missing file is created as ``# Results``.
    """
    from tvtool.io import write_bytes

    doc = path.read_text(encoding="utf-8") if path.exists() else "# Results\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        doc = head + block + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    write_bytes(str(path), doc.encode("utf-8"))
