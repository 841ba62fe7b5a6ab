"""Recipes and the whole pipeline: a declarative list of stages (prune_structured, prune,
oneshot, finetune, quantize, save) run by :func:`compress`, checkpointed after every stage,
measured after every stage, and written up as a report."""

from prunekit.recipes import metrics
from prunekit.recipes.runner import CompressReport, StageResult, compress
from prunekit.recipes.schema import Recipe, RecipeError, Stage, list_recipes, load_recipe

__all__ = [
    "CompressReport",
    "Recipe",
    "RecipeError",
    "Stage",
    "StageResult",
    "compress",
    "list_recipes",
    "load_recipe",
    "metrics",
]
