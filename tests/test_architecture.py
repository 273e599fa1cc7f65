"""The layering the design promises, checked on the source: a thin engine that reaches adapters only through their
registry, small adapter files that share nothing private, one home for the session table, a complete package
list."""

import ast
import configparser
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VTC = ROOT / "vtc"
#: the engine: what compress / restore and a compressed call run, apart from the adapters
CORE = [
    "api",
    "session",
    "instance",
    "registry",
    "budget",
    "record",
    "config",
    "reduce",
    "method",
    "contexts",
    "prefix",
    "flops",
]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(absolute module, imported names)`` of every import in a vtc module (relative ones resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            out.append((module, [alias.name for alias in node.names]))
    return out


@pytest.mark.parametrize("name", CORE)
def test_the_core_reaches_adapters_only_through_their_registry(name):
    for module, names in _imports(VTC / f"{name}.py"):
        targets = [module] if module != "vtc" else [f"vtc.{n}" for n in names]
        for target in targets:
            if target.startswith("vtc.adapters"):
                assert target in ("vtc.adapters", "vtc.adapters.registry"), f"vtc/{name}.py imports {target}"


def test_the_session_table_lives_in_the_api_only():
    users = []
    for path in [*ROOT.glob("vtc/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("eval/*.py")]:
        if path.name != "test_architecture.py" and "_SESSIONS" in path.read_text(encoding="utf-8"):
            users.append(str(path.relative_to(ROOT)))
    assert users == ["vtc/api.py"]


def test_adapter_files_are_small_and_share_nothing_private():
    for path in sorted((VTC / "adapters").glob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= 260, f"{path.name} has {lines} lines"
        for module, names in _imports(path):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{path.name} imports private {private} from {module}"
    session = len((VTC / "session.py").read_text(encoding="utf-8").splitlines())
    assert session <= 220, f"vtc/session.py has {session} lines"


def test_every_package_is_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in VTC.glob("**/__init__.py")}
    assert found | {"vtc.kernels"} == listed


def test_entry_points_resolve():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines():
        target = line.split("=", 1)[1].strip()
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), target
    plugin = cfg["options.entry_points"]["lmms_eval.models"].split("=", 1)[1].strip()
    module, attr = plugin.split(":")
    assert callable(getattr(importlib.import_module(module), attr)), plugin


def test_old_import_paths_are_the_new_modules():
    import vtc.apps.cli
    import vtc.apps.pipelines.results
    import vtc.apps.viz
    import vtc.cli
    import vtc.contexts
    import vtc.hooks
    import vtc.pipelines.results
    import vtc.viz

    assert vtc.hooks is vtc.contexts and vtc.viz is vtc.apps.viz and vtc.cli is vtc.apps.cli
    assert vtc.pipelines.results is vtc.apps.pipelines.results
