"""Bridges to other evaluation harnesses (the top layer: it may use everything below, cli included).

- `himap.integrations.harness`: a harness-independent model: requests (context, visuals,
  generation settings or a continuation) in; texts or log-likelihoods and each sample's pruning
  statistics and analytic TFLOPs out. Needs nothing beyond himap's own dependencies.
- `himap.integrations.lmms_eval`: the lmms-eval model `himap` built on it (needs
  `pip install "himap[lmms-eval]"`); lmms-eval finds it through the `lmms_eval.models` entry point
  declared in pyproject.toml, which points at `lmms_eval_manifest` below.
"""

from __future__ import annotations

LMMS_EVAL_MODEL = "himap"
"""The name lmms-eval knows the model by (`lmms-eval --model himap`)."""

LMMS_EVAL_CLASS = "himap.integrations.lmms_eval.HimapLmms"


def lmms_eval_manifest():
    """The `lmms_eval.models` entry point: lmms-eval's ModelManifest for `--model himap`.

    lmms-eval calls this while it builds its model registry; if any plugin's entry point raises,
    it logs one warning and skips every plugin, so this function only builds the manifest (the
    model's module is imported when the model is used, and its errors surface there)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL, simple_class_path=LMMS_EVAL_CLASS)
