"""The import layers of the package (CONTRIBUTING.md): lower layers never import higher ones."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "chatrex_jax"
# package -> the packages of chatrex_jax it must not import (lazily inside functions included)
FORBIDDEN = {
    "ops": {"protocol", "models", "data", "convert", "train", "inference", "eval", "demo", "tools", "configs"},
    "protocol": {"models", "data", "convert", "train", "inference", "eval", "demo", "tools", "configs"},
    "models": {"data", "convert", "train", "inference", "eval", "demo", "tools", "configs"},
    "data": {"convert", "train", "inference", "eval", "demo", "tools", "configs", "models"},
}


def imported_packages(path: pathlib.Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
        [a.name for a in node.names] if isinstance(node, ast.Import) else []
    for name in names:
      parts = name.split(".")
      if parts[0] == "chatrex_jax" and len(parts) > 1:
        out.add(parts[1])
  return out


def test_lower_layers_do_not_import_higher_ones():
  bad = []
  for package, forbidden in FORBIDDEN.items():
    for path in sorted((PACKAGE / package).rglob("*.py")):
      for dep in imported_packages(path) & forbidden:
        bad.append(f"{path.relative_to(PACKAGE.parent)} imports chatrex_jax.{dep}")
  assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_imports(tmp_path):
  probe = tmp_path / "probe.py"
  probe.write_text("def f():\n  from chatrex_jax.inference import processor\n  import chatrex_jax.data.merge\n")
  assert imported_packages(probe) == {"inference", "data"}
