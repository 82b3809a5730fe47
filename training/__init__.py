"""Calibration of sparsemem's learned modules: recipes, data, objectives, the training loop, evaluation
and export. Run `sparsemem calibrate RECIPE.yaml` or `accelerate launch -m sparsemem.training RECIPE.yaml`."""

from .recipe import Recipe, load_recipe, parse_recipe
from .trainer import StopTraining, train

__all__ = ["Recipe", "StopTraining", "load_recipe", "parse_recipe", "train"]
