"""Method recipes: `build_recipe(cfg, ...)` picks one by `cfg.method`."""
from trainer.recipes.base import Recipe, RetrievalModel, StepInfo


def build_recipe(cfg, *, embed_dim: int, num_classes: int, num_samples: int, tokenizer,
                 grid_hw: tuple[int, int]) -> Recipe:
    """num_classes: training identities; num_samples: training pairs (per-sample state)."""
    if cfg.method == "irra":
        from trainer.recipes.irra import IRRA

        return IRRA(cfg, embed_dim=embed_dim, num_classes=num_classes, tokenizer=tokenizer)
    if cfg.method == "rde":
        from trainer.recipes.rde import RDE

        return RDE(cfg, embed_dim=embed_dim, num_samples=num_samples, grid_hw=grid_hw)
    raise ValueError(f"method {cfg.method!r} has no recipe")


__all__ = ["Recipe", "RetrievalModel", "StepInfo", "build_recipe"]
