"""himap: hierarchical modality-aware pruning (HiMAP), FastV and information-flow analysis for
HuggingFace multimodal LLMs. `import himap` is cheap: torch and transformers load on first use.

    import himap
    handle = himap.apply(model, "himap")      # or a himap.Schedule
    model.generate(**inputs)
    print(handle.stats)                        # tokens per layer, kept positions, KV lengths
    himap.remove(model)

    with himap.pruned(model, "fastv") as handle:
        ...
"""

from himap.prune.schedule import (
    PRESETS,
    Schedule,
    Stage,
    get_schedule,
    image_tokens_per_layer,
)

__version__ = "0.1.0"

__all__ = ["apply", "remove", "pruned", "maybe_pruned", "PruneHandle", "Schedule", "Stage", "PRESETS",
           "get_schedule", "image_tokens_per_layer", "__version__"]


def __getattr__(name):
    if name in ("apply", "remove", "pruned", "maybe_pruned", "PruneHandle"):
        from himap.prune import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'himap' has no attribute {name!r}")
