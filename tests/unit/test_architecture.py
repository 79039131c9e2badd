"""Dependencies point inward: service, workers -> adapters, models -> core (DESIGN.md)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STDLIB = set(sys.stdlib_module_names)
ALLOWED = {
    "core": {"core", "numpy", "scipy", "pydantic"},
    "adapters": {
        "core",
        "adapters",
        "matplotlib",
        "pydicom",
        "highdicom",
        "fhir",
        "httpx",
        "sqlalchemy",
        "pydantic",
        "pydantic_settings",
        "numpy",
        "scipy",
        "redis",
        "nibabel",
        "jwt",
        "cryptography",
        "psycopg",
        "prometheus_client",
        "dicomweb_client",
    },
    "models": {
        "core",
        "adapters",
        "models",
        "torch",
        "monai",
        "transformers",
        "peft",
        "safetensors",
        "numpy",
        "scipy",
    },
    "service": {
        "core",
        "adapters",
        "service",
        "fastapi",
        "starlette",
        "pydantic",
        "httpx",
        "jinja2",
        "numpy",
        "fhir",
        "jwt",
        "sqlalchemy",  # service.users: accounts and sessions in the store's database
        "argon2",  # password hashing
        "markdown_it",  # the model card page (raw HTML off)
    },
    # fixtures also start the real services the integration tests talk to
    "fixtures": {
        "core",
        "adapters",
        "fixtures",
        "numpy",
        "scipy",
        "pydicom",
        "httpx",
        "psycopg",
        "sqlalchemy",
        "uvicorn",  # serve_app: the API on a thread for a test
    },
}

# Scripts that measure a model on the synthetic cohort read its ground truth format.
EXCEPTIONS = {"models/segmentation/evaluate.py": {"fixtures"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - STDLIB - {"__future__"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_its_layer_may(package):
    bad: list[str] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        extra = _imports(path) - ALLOWED[package] - EXCEPTIONS.get(rel, set())
        if extra:
            bad.append(f"{rel}: {sorted(extra)}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)
