"""The package's layers point one way (README, "Architecture"): the bottom modules
(config.py, events.py, users.py, limits.py, ...) import none of cluster/, worker/,
supervisor/; cluster/ imports neither worker/ nor supervisor/; worker/ does not
import supervisor/. Every import counts, also one inside a function or under
TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ftpcluster"
LAYERS = ("cluster", "worker", "supervisor")
# module (relative to the package) -> layers it must not import
FORBIDDEN = {
    **{bottom: LAYERS for bottom in ("config.py", "config_doc.py", "events.py", "users.py", "limits.py",
                                     "sizes.py", "durations.py", "logs.py")},  # fmt: skip
    "cluster": ("worker", "supervisor"),
    "worker": ("supervisor",),
}


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in the file."""
    parts = ["ftpcluster", *path.relative_to(PACKAGE).with_suffix("").parts]
    here = parts[:-1]  # the package the module is in
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:  # from . import x: x may be a module
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "ftpcluster" and parts[1] in LAYERS else None


def test_imports_point_one_way() -> None:
    wrong = []
    for rule, banned in FORBIDDEN.items():
        target = PACKAGE / rule
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        assert files, rule
        for f in files:
            for line, mod in imported(f):
                if layer_of(mod) in banned:
                    wrong.append(f"{f.relative_to(PACKAGE.parent)}:{line} imports {mod}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_check_sees_relative_imports(tmp_path: Path) -> None:
    """The parser resolves `from ..worker import x` inside cluster/ (else the test above proves nothing)."""
    f = PACKAGE / "cluster" / "metrics_layout.py"
    mods = {m for _, m in imported(f)}
    assert "ftpcluster.config" in mods and "ftpcluster.cluster.metrics_store" in mods
