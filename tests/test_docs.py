"""Every document a docstring, comment or doc page points at is in the repository, and every method has a page.

A reference is a path ending in ``.md`` (``docs/design.md``, ``[kernels](docs/kernels.md)``); it must name a file
relative to the repository root or to the referring file's folder (a bare file name: some file of that name).
Section signs would point into documents without naming them, so code does not use them.
"""

import ast
import io
import json
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

import vtc

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"(?<![\w./-])((?:\.\.?/)?[\w][\w./-]*\.md)\b")


def _tracked(*suffixes: str) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        text=True,
        capture_output=True,
        check=True,
    ).stdout.split()
    return [ROOT / p for p in out if p.endswith(suffixes) and (ROOT / p).is_file()]


def _python_prose(path: Path) -> list[tuple[int, str]]:
    """Docstrings and comments of a Python file, with their line numbers."""
    source = path.read_text(encoding="utf-8")
    prose = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    prose.append((first.lineno, first.value.value))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            prose.append((tok.start[0], tok.string))
    return prose


def _notebook_prose(path: Path) -> list[tuple[int, str]]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "markdown"]


def _prose() -> list[tuple[Path, int, str]]:
    out = []
    for path in _tracked(".py"):
        out += [(path, line, text) for line, text in _python_prose(path)]
    for path in _tracked(".md"):
        out.append((path, 1, path.read_text(encoding="utf-8")))
    for path in _tracked(".ipynb"):
        out += [(path, cell, text) for cell, text in _notebook_prose(path)]
    return out


def test_every_referenced_document_is_in_the_repository():
    names = {p.name for p in _tracked(".md")}
    missing = []
    for path, line, text in _prose():
        for ref in REFERENCE.findall(text):
            if (ROOT / ref).is_file() or (path.parent / ref).is_file() or ("/" not in ref and ref in names):
                continue
            missing.append(f"{path.relative_to(ROOT)}:{line}: {ref}")
    assert not missing, "references to documents that are not in the repository:\n" + "\n".join(missing)


def test_code_names_the_document_it_refers_to():
    signs = [
        f"{path.relative_to(ROOT)}:{line}"
        for path, line, text in _prose()
        if path.suffix == ".py" and "\u00a7" in text
    ]
    assert not signs, f"section signs point into unnamed documents: {signs}"


@pytest.mark.parametrize("info", vtc.list_methods(), ids=lambda info: info.name)
def test_every_method_has_a_page_and_documented_options(info):
    assert (ROOT / "docs" / "methods" / f"{info.name}.md").is_file()
    doc = info.config_class.__doc__ or ""
    options = [f for f in info.config_class.field_names() if f not in vtc.MethodConfig.field_names()]
    assert "Args:" in doc or not options, f"{info.config_class.__name__} documents no options"
    for name in options:
        assert re.search(rf"\b{name}\b", doc), f"{info.config_class.__name__} does not document {name!r}"


def test_the_bad_input_table_quotes_messages_the_code_still_gives():
    """``docs/errors.md``: each message excerpt (backticked, outside parentheses) of its last column is in the code."""
    source = "\n".join(
        p.read_text(encoding="utf-8")
        for p in [*ROOT.glob("vtc/**/*.py"), *ROOT.glob("kernels/*.py")]
        if "offline" not in p.parts
    )
    table = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8").splitlines()
    rows = [line for line in table if line[:2] == "| "]
    quoted = []
    for row in rows[2:]:
        depth, tick, span = 0, False, ""
        for ch in row.strip().strip("|").split(" | ")[-1]:
            if ch == "`":
                if tick and depth == 0:
                    quoted.append(span)
                tick, span = not tick, ""
            elif tick:
                span += ch
            elif ch in "()":
                depth += 1 if ch == "(" else -1
    assert len(quoted) > 60
    missing = [q for q in quoted if q not in source]
    assert not missing, f"docs/errors.md quotes messages the code no longer gives: {missing}"
