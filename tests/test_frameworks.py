"""Trainer-framework plugins: `import dowser` imports no framework, and each integration
module names its extra when its framework is missing. The real training runs of Axolotl,
ms-swift and LLaMA-Factory need their own environments: tests/frameworks/run_*.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ["lightning", "pytorch_lightning", "axolotl", "swift", "llamafactory"]


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(ROOT), timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_dowser_imports_no_framework():
    code = ("import sys, dowser, dowser.integrations, dowser.integrations._common, "
            "dowser.integrations.hf\n"
            f"print([m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}])")
    assert _run(code).strip() == "[]"


@pytest.mark.parametrize("name,extra", [("axolotl", "axolotl"), ("swift", "swift"),
                                        ("llamafactory", "llamafactory")])
def test_missing_framework_names_its_extra(name, extra):
    import importlib.util

    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here")
    code = (f"try:\n    import dowser.integrations.{name}\nexcept ImportError as e:\n"
            "    print(e)\n")
    assert f'dowser[{extra}]' in _run(code)
