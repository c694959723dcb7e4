"""The two trees share no code: numpy_ref works without torch, torch_impl never leans on numpy_ref.

Two checks, both re-reading the trees each run so files added later are covered:
- every module of `numpy_ref` imports in a fresh interpreter where `import torch` fails;
- the sources, parsed with `ast` (every `import`, including ones inside functions): no file in
  numpy_ref imports torch or the other packages, nothing outside numpy, the standard library
  and `regex` (docs/design.md's table); no file in torch_impl imports numpy_ref.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMPY_REF_ALLOWED = {"numpy", "regex", "numpy_ref"}  # plus the standard library
PROJECT_PACKAGES = {"numpy_ref", "torch_impl", "parity_tests", "benchmarks", "gpt_oracle"}


def sources(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files found under {ROOT / package}"
    return files


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module name) for every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a relative import stays inside the file's own package
                found.append((node.lineno, path.relative_to(ROOT).parts[0]))
            else:
                found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, str(node.args[0].value).split(".")[0]))
    return found


def test_import_scanner_sees_every_form(tmp_path):
    """The scanner finds top-level, nested, `from` and `importlib` imports (else the tests below prove nothing)."""
    f = tmp_path / "sample.py"
    f.write_text(textwrap.dedent("""
        import os, torch.nn as nn
        from numpy_ref.tensor import Tensor
        def f():
            import tiktoken
            return importlib.import_module("safetensors.numpy")
    """))
    names = {m for _, m in imported_modules(f)}
    assert names == {"os", "torch", "numpy_ref", "tiktoken", "safetensors"}, f"scanner found {names}"


@pytest.mark.parametrize("path", sources("numpy_ref"), ids=lambda p: p.name)
def test_numpy_ref_imports_only_numpy_regex_and_stdlib(path):
    bad = [(line, m) for line, m in imported_modules(path)
           if m not in NUMPY_REF_ALLOWED and m not in sys.stdlib_module_names]
    assert not bad, (f"{path.relative_to(ROOT)} imports {[m for _, m in bad]} at lines {[l for l, _ in bad]}; "
                     f"numpy_ref may import only numpy, regex and the standard library (docs/design.md)")


@pytest.mark.parametrize("path", sources("torch_impl"), ids=lambda p: p.name)
def test_torch_impl_never_imports_numpy_ref(path):
    bad = [(line, m) for line, m in imported_modules(path) if m in {"numpy_ref", "parity_tests"}]
    assert not bad, f"{path.relative_to(ROOT)} imports {[m for _, m in bad]} at lines {[l for l, _ in bad]}"


BLOCKED_IMPORT = r"""
import importlib, pkgutil, sys

class Block:
    '''Refuse torch (and anything under it) the way a missing install would.'''
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name == "torch_impl" or name.startswith("torch_impl."):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
import numpy_ref
names = ["numpy_ref"] + [m.name for m in pkgutil.walk_packages(numpy_ref.__path__, "numpy_ref.")]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, f"torch modules loaded: {loaded}"
print("\n".join(names))
"""


def test_every_numpy_ref_module_imports_with_torch_blocked():
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"importing numpy_ref with torch blocked failed:\n{result.stderr[-3000:]}"
    imported = set(result.stdout.split())
    expected = {"numpy_ref"} | {f"numpy_ref.{p.stem}" for p in (ROOT / "numpy_ref").glob("*.py") if p.stem != "__init__"}
    assert expected <= imported, f"modules not imported: {sorted(expected - imported)}"


def test_engine_works_with_torch_blocked():
    """Not only importable: a forward and backward through the engine run without torch."""
    script = BLOCKED_IMPORT.split("import numpy_ref\n")[0] + textwrap.dedent("""
        import numpy as np
        from numpy_ref.tensor import Tensor
        from numpy_ref.functional import cross_entropy
        x = Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
        loss = cross_entropy(x * 0.5, np.array([2, 0]))
        loss.backward()
        assert x.grad.shape == (2, 3) and abs(x.grad.sum()) < 1e-12, x.grad
        assert "torch" not in sys.modules
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"the engine failed with torch blocked:\n{result.stderr[-3000:]}"
