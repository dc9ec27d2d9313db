"""Tiny random LLaVA models and inputs, for tests and smoke runs (no download, no weights).

`tiny_llava()` builds a LlavaForConditionalGeneration (CLIP tower + projector + Llama decoder)
from configs; `save_and_load()` round-trips it through `from_pretrained` so tests exercise the
real loading path.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN_ID = 3  # the tiny models' image token id (not the last id, to catch hard-coding)
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2


def tiny_llava_config(num_layers: int = 10, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                      image_size: int = 32, patch: int = 4, vocab: int = 128,
                      attn_implementation: str = "sdpa"):
    """A LlavaConfig with (image_size/patch)^2 image tokens (64 by default) and a GQA Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=patch,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=num_layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=512,
                       pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                       rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    cfg._attn_implementation = attn_implementation
    return cfg


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", **config_kwargs):
    """A random tiny LlavaForConditionalGeneration in fp32 eval mode."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = tiny_llava_config(attn_implementation=attn_implementation, **config_kwargs)
    model = LlavaForConditionalGeneration(cfg).eval()
    _tiny_generation_config(model)
    return model


def _tiny_generation_config(model):
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None  # tiny random models: always generate max_new_tokens
    model.generation_config.suppress_tokens = [IMAGE_TOKEN_ID]  # never emit <image>, as real LLaVA


def save_and_load(model, directory, attn_implementation: str = "sdpa"):
    """Save `model` to `directory` and load it back through AutoModelForImageTextToText."""
    from transformers import AutoModelForImageTextToText

    model.save_pretrained(directory)
    loaded = AutoModelForImageTextToText.from_pretrained(directory, attn_implementation=attn_implementation,
                                                         dtype=torch.float32)
    _tiny_generation_config(loaded)
    return loaded.eval()


def num_image_tokens(config) -> int:
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2


def tiny_inputs(config, n_system=(5,), n_instruction=(7,), seed: int = 0, left_pad: bool = True):
    """A (left-padded) batch: [BOS, system..., <image>*N, instruction...] per sample.

    Returns a dict with input_ids, attention_mask and pixel_values, ready for forward/generate.
    """
    g = torch.Generator().manual_seed(seed)
    n_img = num_image_tokens(config)
    vocab = config.text_config.vocab_size
    rows = []
    for ns, ni in zip(n_system, n_instruction):
        sys_ids = torch.randint(4, vocab, (ns,), generator=g)
        ins_ids = torch.randint(4, vocab, (ni,), generator=g)
        rows.append(torch.cat([torch.tensor([BOS_TOKEN_ID]), sys_ids,
                               torch.full((n_img,), IMAGE_TOKEN_ID), ins_ids]))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if left_pad else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    v = config.vision_config
    pixel_values = torch.randn((len(rows), 3, v.image_size, v.image_size), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}


def save_tiny_model_dir(path, seed: int = 0, **config_kwargs) -> str:
    """Save a tiny random LLaVA with the offline processor (32-pixel images, 4-pixel patches:
    64 image tokens) to `path`, loadable by himap.models.loading.load_model like any checkpoint."""
    from himap.builtin.offline_processor import build_processor

    tiny_llava(seed=seed, **config_kwargs).save_pretrained(path)
    build_processor(image_size=32, patch_size=4).save_pretrained(path)
    return str(path)
