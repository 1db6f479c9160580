"""Shipped YAML recipes, found by path or by name (``quickstart`` -> ``recipes/quickstart.yaml``)."""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def recipe_path(name: str) -> Path:
    """Resolve a recipe given as a path or as a name (``quickstart`` -> ``recipes/quickstart.yaml``)."""
    candidate = Path(name)
    if candidate.is_file():
        return candidate
    for folder in (Path.cwd() / "recipes", RECIPES_DIR):
        for path in (folder / name, folder / f"{name}.yaml"):
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"No recipe file or name {name!r}. Available recipes: {', '.join(list_recipes())}."
    )


def list_recipes() -> list[str]:
    """Names of the recipes shipped with vitkit."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
