"""Data flows one way: a subpackage imports only from those to its left.

    config, errors, data, eval  ->  model  ->  meta  ->  distributed  ->  report, cli
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "metarec_dist"
LAYERS = {"errors": 0, "config": 0, "machine": 0, "allocator": 0, "device": 0, "storage": 0,
          "cluster_manifests": 0, "data": 1, "eval": 1, "retrieval": 1,
          "model": 2, "meta": 3, "distributed": 4, "report": 5, "cli": 6}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "metarec_dist" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def test_no_module_imports_from_a_later_layer():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        own = layer_of("metarec_dist." + path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", "."))
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                target = layer_of(name)
                if target is not None and target > own:
                    violations.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not violations, violations


def test_data_layer_does_not_import_torch_or_ray():
    for path in (PACKAGE / "data").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in {"torch", "ray", "deepspeed"} for n in names), path
