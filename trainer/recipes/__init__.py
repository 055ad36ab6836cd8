"""Method recipes: `build_recipe(cfg, ...)` picks one by `cfg.method`."""
from trainer.recipes.base import Recipe, RetrievalModel, StepInfo


def build_recipe(cfg, *, embed_dim: int, num_classes: int, tokenizer) -> Recipe:
    if cfg.method == "irra":
        from trainer.recipes.irra import IRRA

        return IRRA(cfg, embed_dim=embed_dim, num_classes=num_classes, tokenizer=tokenizer)
    raise ValueError(f"method {cfg.method!r} has no recipe yet")


__all__ = ["Recipe", "RetrievalModel", "StepInfo", "build_recipe"]
