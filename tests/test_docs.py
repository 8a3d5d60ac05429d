"""The documentation stands on its own: no reference outside the repository, links that
resolve, the README short and its quick start the two commands .ci/run relies on."""

from __future__ import annotations

import os
import re

from tests.conftest import ROOT

QUICK_START = ["pip install torch==2.13.0 -e . && python -m experiments.compare",
               "pip install torch==2.13.0 -e '.[test]' && python -m pytest"]


def _files(*tops: str) -> list[str]:
    out = []
    for top in tops:
        path = os.path.join(ROOT, top)
        if os.path.isfile(path):
            out.append(path)
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            out += [os.path.join(root, f) for f in files if f.endswith((".md", ".py", ".yaml"))]
    return sorted(out)


def test_nothing_refers_outside_the_repository():
    hits = []
    for f in _files("README.md", "docs", "partition", "experiments", "conf"):
        for i, line in enumerate(open(f, encoding="utf-8"), 1):
            if re.search(r"\.\./shared|DESIGN §", line):
                hits.append(f"{os.path.relpath(f, ROOT)}:{i}")
    assert hits == []


def test_readme_is_short_and_starts_with_the_two_commands():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.splitlines()) < 260
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert block == QUICK_START
    assert "![summary.png" in text and os.path.isfile(os.path.join(ROOT, "docs", "img",
                                                                   "summary.png"))


def test_every_relative_link_resolves():
    broken = []
    for f in _files("README.md", "docs"):
        if not f.endswith(".md"):
            continue
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", open(f, encoding="utf-8").read()):
            if "://" in target:
                continue
            if not os.path.exists(os.path.join(os.path.dirname(f), target)):
                broken.append(f"{os.path.relpath(f, ROOT)} -> {target}")
    assert broken == []
