"""The package imports cleanly: no import cycles, each probe room alone, every subpackage
installed, and no clone folder named `dowser` shadowing the install."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The package under test: the source tree's dowser/ (editable), or the installed one when
# the tests run against a wheel (its dowser/ then also holds kernels/ and _csrc/).
PKG = Path(importlib.util.find_spec("dowser").origin).parent
ROOMS = ["dowser.probe.targets", "dowser.probe.draws", "dowser.probe.prompts",
         "dowser.probe.batches", "dowser.probe.estimator", "dowser.probe.stats", "dowser.cli"]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _module_level_imports(tree: ast.Module, name: str, is_pkg: bool, mods: set[str]) -> set[str]:
    """Modules that `name` imports when it is executed (not inside functions or classes, not
    under `if TYPE_CHECKING`). `from P import x` depends on P.x when that is a module, else on
    P's __init__ (an attribute of a package that is still initialising: the cycle that breaks)."""
    deps: set[str] = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in mods:
                        deps.add(sub)
                    elif src in mods:
                        deps.add(src)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(tree.body)
    deps.discard(name)
    return deps


def test_no_import_cycles():
    mods = _modules()
    graph = {n: _module_level_imports(ast.parse(p.read_text()), n, p.name == "__init__.py",
                                      set(mods)) for n, p in mods.items()}
    assert graph["dowser.masks"], "the import graph reader found nothing: it is broken"
    cycles = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                dfs(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_reader_sees_a_cycle():
    # The checker itself can fail: two modules importing each other form a cycle.
    mods = {"p", "p.a", "p.b"}
    a = _module_level_imports(ast.parse("from p.b import f\n"), "p.a", False, mods)
    b = _module_level_imports(ast.parse("from . import a\ndef g():\n    import p\n"), "p.b",
                              False, mods)
    assert a == {"p.b"} and b == {"p.a"}


def test_each_room_imports_alone():
    """`python -c "import dowser.probe.targets"` and so on, each in a fresh interpreter."""
    env = {**os.environ, "PYTHONWARNINGS": "error::ImportWarning"}
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for m in ROOMS}
    failed = {}
    for m, p in procs.items():
        out, _ = p.communicate(timeout=120)
        if p.returncode:
            failed[m] = out.strip().splitlines()[-1:]
    assert not failed, failed


def test_every_subpackage_is_installed():
    """A subpackage missing from pyproject's list works in an editable install and is absent
    from a wheel."""
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("needs the source tree's pyproject.toml (an installed package has what it has)")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(PKG.parent).parts) for p in PKG.rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_a_clone_folder_named_dowser_does_not_shadow_the_install(tmp_path):
    """Python run from the folder that holds a clone named `dowser` must import the package,
    not the clone folder as an empty namespace package (setup.py's editable_config)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("model-dowser")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("model-dowser is not installed (run from the source tree)")
    (tmp_path / "dowser" / "dowser").mkdir(parents=True)  # a clone folder, as git makes it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import dowser; print(dowser.MaskSet)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    editable = any(f.name.endswith(".pth") for f in dist.files or [])
    assert out.returncode == 0, (
        "a folder named dowser in the working directory hides the installed package"
        + (" (editable install made before setup.py's fix: reinstall with "
           "`pip install --no-build-isolation -e .`)" if editable else "")
        + ":\n" + out.stderr[-500:])


def test_the_kernels_folder_never_shadows_the_kernels_distribution():
    """transformers >= 5.25 imports Hugging Face's `kernels` distribution. Python run from the
    clone's root (as pytest and `python -c` do) must find that one, never our kernels/ folder,
    which must still be importable as `dowser.kernels`."""
    import importlib.util

    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder a regular package that shadows the `kernels` "
        "distribution from the repository root (docs/development.md)")
    code = (
        "import importlib.util, json, sys\n"
        "import dowser.kernels._availability\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "out = {'origin': spec.origin if spec else None,\n"
        "       'locations': list(spec.submodule_search_locations or []) if spec else []}\n"
        "if spec is not None and spec.origin is not None:\n"
        "    import transformers.modeling_utils, kernels\n"
        "    out['file'] = kernels.__file__\n"
        "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-800:]
    import json

    seen = json.loads(res.stdout.strip().splitlines()[-1])
    if importlib.util.find_spec("transformers") is not None and seen["origin"] is not None:
        assert not Path(seen["file"]).resolve().is_relative_to(ROOT), seen
    # Without the distribution, `kernels` from the root is at most an empty namespace portion.
    assert seen["origin"] is None or not Path(seen["origin"]).resolve().is_relative_to(ROOT), seen
