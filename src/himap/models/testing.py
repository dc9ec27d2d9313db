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


# ----------------------------------------------------------------------------- other families

FAMILIES = ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "internvl", "qwen3_vl")
"""Families with a tiny random model here (transformers' own config and model classes)."""
VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl")
"""Families whose tiny model takes video through the offline processor (InternVL sees a video as
one image per frame; the offline Qwen3-VL processor takes images only)."""
FAMILY_VOCAB = 160  # the offline tokenizer's ids stay below 128 + the family's special tokens


def _text_kwargs(num_layers: int, hidden: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                rms_norm_eps=1e-6, tie_word_embeddings=False)


def tiny_family_config(family: str, tokenizer=None, num_layers: int = 10, hidden: int = 64, heads: int = 4,
                       kv_heads: int = 2, image_size: int = 32, patch: int = 8, vocab: int = FAMILY_VOCAB):
    """A tiny config of `family` (FAMILIES) from transformers' own config classes; visual token ids
    come from `tokenizer` (the offline processor's) when given."""
    import transformers as tf

    ids = {}
    if tokenizer is not None:
        for key, name in (("image", "image_token"), ("video", "video_token"), ("start", "vision_start_token"),
                          ("end", "vision_end_token")):
            if hasattr(tokenizer, name):
                ids[key] = tokenizer.convert_tokens_to_ids(getattr(tokenizer, name))
    text = _text_kwargs(num_layers, hidden, heads, kv_heads, vocab)
    if family == "llava_next":
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=image_size, patch_size=patch, projection_dim=32)
        return tf.LlavaNextConfig(vision_config=vision, text_config=tf.LlamaConfig(**text),
                                  image_token_index=ids.get("image", IMAGE_TOKEN_ID),
                                  image_grid_pinpoints=[[image_size, 2 * image_size], [2 * image_size, image_size],
                                                        [2 * image_size, 2 * image_size]],
                                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    if family == "llava_onevision":
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch)
        return tf.LlavaOnevisionConfig(vision_config=vision, text_config=tf.Qwen2Config(**text),
                                       image_token_index=ids.get("image", IMAGE_TOKEN_ID),
                                       video_token_index=ids.get("video", IMAGE_TOKEN_ID + 100),
                                       image_grid_pinpoints=[[image_size, 2 * image_size],
                                                             [2 * image_size, image_size],
                                                             [2 * image_size, 2 * image_size]],
                                       vision_feature_layer=-1, vision_feature_select_strategy="full")
    if family == "internvl":
        vision = tf.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=[image_size, image_size],
                                         patch_size=[patch, patch])
        return tf.InternVLConfig(vision_config=vision, text_config=tf.Qwen2Config(**text),
                                 image_token_id=ids.get("image", IMAGE_TOKEN_ID),
                                 image_seq_length=(image_size // patch) ** 2 // 4, downsample_ratio=0.5,
                                 vision_feature_layer=-1)
    head_dim = hidden // heads
    third = head_dim // 2 // 3
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * third, third, third]}
    qwen_ids = dict(image_token_id=ids.get("image", IMAGE_TOKEN_ID), video_token_id=ids.get("video", 120),
                    vision_start_token_id=ids.get("start", 121), vision_end_token_id=ids.get("end", 122))
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=patch,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        return tf.Qwen2VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **qwen_ids)
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=hidden, intermediate_size=64, num_heads=2,
                      patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, in_chans=3,
                      window_size=4 * patch, fullatt_block_indexes=[1])
        return tf.Qwen2_5_VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **qwen_ids)
    if family == "qwen3_vl":
        vision = dict(depth=3, hidden_size=32, out_hidden_size=hidden, intermediate_size=64, num_heads=2,
                      patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2])
        rope = {**rope, "mrope_interleaved": True}
        return tf.Qwen3VLConfig(text_config={**text, "head_dim": head_dim, "rope_parameters": rope},
                                vision_config=vision, **qwen_ids)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def tiny_family_model(family: str, tokenizer=None, seed: int = 0, attn_implementation: str = "sdpa", **config_kwargs):
    """A random tiny model of `family` in fp32 eval mode (AutoModelForImageTextToText of its config)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    cfg = tiny_family_config(family, tokenizer, **config_kwargs)
    model = AutoModelForImageTextToText.from_config(cfg, attn_implementation=attn_implementation,
                                                    dtype=torch.float32).eval()
    _tiny_generation_config(model)
    model.generation_config.suppress_tokens = list(_visual_ids(cfg))
    return model


def _visual_ids(config) -> list[int]:
    ids = [getattr(config, k, None) for k in ("image_token_id", "video_token_id")]
    return sorted({int(i) for i in ids if i is not None})


def family_processor(family: str):
    """The offline processor of a tiny `family` model (32-pixel tiles, 8-pixel patches)."""
    from himap.builtin.offline_processor import build_family_processor

    return build_family_processor(family, image_size=32, patch_size=8)


def save_tiny_family_dir(path, family: str, seed: int = 0, **config_kwargs) -> str:
    """Save a tiny random `family` model with its offline processor to `path` (loadable by
    himap.models.loading.load_model like any checkpoint)."""
    processor = family_processor(family)
    model = tiny_family_model(family, processor.tokenizer, seed=seed, **config_kwargs)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def random_images(sizes, seed: int = 0) -> list:
    """Random RGB PIL images of the given (width, height) sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def family_batch(processor, samples: list[dict], seed: int = 0) -> dict:
    """A left-padded batch through the processor's chat template. Each sample is a dict with
    "images" (list of (w, h) sizes), optional "video" (frame count, (w, h) of the frames),
    "system" and "text" (words of the offline vocabulary); images come first (the word "and" between
    two), then the video."""
    texts, images, videos = [], [], []
    for i, s in enumerate(samples):
        content = []
        for j, _ in enumerate(s.get("images", ())):  # text between images (a real template has newlines there)
            content += ([{"type": "text", "text": " and "}] if j else []) + [{"type": "image"}]
        if s.get("video"):
            content.append({"type": "video"})
            n, size = s["video"]
            videos.append(random_images([size] * n, seed=seed + 1000 + i))
        content.append({"type": "text", "text": s.get("text", "What is this ?")})
        messages = ([{"role": "system", "content": s["system"]}] if s.get("system") else []) + \
            [{"role": "user", "content": content}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        images += random_images(s.get("images", ()), seed=seed + i)
    batch = processor(images=images or None, videos=videos or None, text=texts, return_tensors="pt", padding=True)
    return dict(batch)


def tiny_llama_processor(texts, image_size: int = 32, patch: int = 4):
    """A LlavaProcessor around a Llama (sentencepiece-style BPE: Metaspace, byte fallback, BOS added)
    tokenizer whose vocabulary holds every '▁word' of `texts`, so a chunk starting with a newline
    tokenizes as '▁', '<0x0A>' as LLaVA-1.5's tokenizer does (ids 29871, 13)."""
    from transformers import LlamaTokenizer, LlavaProcessor

    from himap.builtin.offline_processor import build_image_processor

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = []

    def piece(p):
        for ch in p:
            vocab.setdefault(ch, len(vocab))
        for i in range(1, len(p)):
            if p[:i + 1] not in vocab:
                merges.append((p[:i], p[i]))
                vocab[p[:i + 1]] = len(vocab)

    piece("\u2581")
    for t in texts:
        for w in t.replace("\n", " ").replace("<image>", " ").split(" "):
            if w:
                piece("\u2581" + w)
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, pad_token="<unk>",
                         extra_special_tokens={"image_token": "<image>"})
    return LlavaProcessor(image_processor=build_image_processor(image_size), tokenizer=tok, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
