"""The README only points at files a clone has, and its two fresh-machine commands exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TOP = {p.name for p in REPO.iterdir() if not p.name.startswith(".")}


def referenced_paths() -> set[str]:
    """Markdown link targets, and `code` spans that look like paths inside the repo."""
    links = re.findall(r"\]\(([^)#\s]+)\)", README)
    spans = [s.split()[0] for s in re.findall(r"`([^`\n]+)`", README) if s.split()]
    out = set()
    for p in links + spans:
        p = p.rstrip(".,:;")
        if "://" in p or p.startswith(("-", "$", "~")) or "*" in p or "<" in p or "YYYY" in p:
            continue
        outside = p.startswith("../") and (p in links or Path(p).suffix)  # a document or file out of the repo
        if outside or (("/" in p) and p.split("/")[0] in TOP):
            out.add(p)  # (a folder named as a default, such as --data_path's, may sit outside)
    return out


def exists(p: str) -> bool:
    """In the repo; a folder named with a trailing slash may be one a command writes, if its parent exists."""
    path = REPO / p
    return path.exists() or (p.endswith("/") and path.parent.is_dir())


def test_readme_references_exist_in_a_clone():
    missing = sorted(p for p in referenced_paths() if p.startswith("../") or not exists(p))
    assert not missing, f"README.md points at files a fresh clone lacks: {missing}"


def test_readme_has_the_two_fresh_machine_commands():
    assert "bash scripts/demo.sh" in README and "bash scripts/test.sh" in README
    assert (REPO / "scripts" / "demo.sh").is_file() and (REPO / "scripts" / "test.sh").is_file()
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
