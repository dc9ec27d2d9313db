"""Analytic cost model: FLOPs of a pruning schedule and KV-cache bytes (paper section 4.2, eq. 10).

Two conventions, both computed from the same per-layer token counts (`layer_tokens`):

- Paper convention (`paper_flops`): image tokens only. One layer with n image tokens costs
  Omega(n) = 4nd^2 + 2n^2d + 2ndm (eq. 10's per-layer term), summed over the L decoder layers.
  Omega counts multiply-accumulates (four d x d projections, QK^T and AV, a two-matrix FFN), so
  its "FLOPs" are MACs; for LLaVA-1.5-7B it gives 2.986 T for vanilla, which the paper's tables
  print as 2.98 (they truncate, see `truncate`).
- Full count (`full_cost`): real FLOPs (2 per multiply-accumulate, what torch.utils.flop_counter
  reports) over every token in the sequence: system + image + instruction tokens, GQA-aware K/V
  projections, the gated three-matrix Llama MLP, attention over the sequence each layer actually
  holds, the ranking rows of each stage (and the peers' selection work: PyramidDrop's recomputed
  projections, DART's and DivPrune's similarities, VisionZip's [CLS] row and merge similarities on
  the vision side), the LM head of each generated token, and the decode steps attending to the
  pruned KV cache. Optionally the vision tower and projector.
  Elementwise work (norms, RoPE, softmax, activations) is not counted, as in flop_counter.

Architecture presets come from public configs and need no weights; `Arch.from_config` reads any
LLaVA-style config (text_config / vision_config), and `Arch.to_llava_config` builds a LlavaConfig
of that size so a random model can be instantiated for benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from himap.prune.schedule import PEER_CRITERIA, Schedule, get_schedule, image_tokens_per_layer

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
"""Bytes per element of the KV cache for each dtype name."""

ATTENTION_MODES = ("dense", "causal")
"""dense: every query row times every key (what SDPA/eager kernels compute and flop_counter
counts); causal: only the query-key pairs the causal mask leaves (i attends to keys 0..i)."""


@dataclass(frozen=True)
class VisionArch:
    """A ViT (CLIP) vision tower as LLaVA runs it: all layers run, the projector reads one."""

    image_size: int  # pixels per side of the square input image
    patch_size: int  # ViT patch size: the tower sees (image_size / patch_size)^2 patches + 1 CLS token
    hidden: int  # tower hidden size
    intermediate: int  # tower MLP size (two matrices, quick-GELU)
    num_layers: int  # encoder layers; HF LLaVA runs all of them and reads layer -2
    num_heads: int  # attention heads (only needed to build a config)
    channels: int = 3  # input channels of the patch embedding
    tiles: int = 1  # tower passes per image (LLaVA-NeXT anyres: base image + 4 crops = 5)
    merge: int = 1  # patches merged into one visual token per side (Qwen2.5-VL: 2, so 4 patches a token)
    cls_token: bool = True  # the tower adds a CLS token (CLIP); Qwen's ViT does not
    gated_mlp: bool = False  # three-matrix (SwiGLU) MLP (Qwen2.5-VL's ViT) instead of two

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class Arch:
    """Sizes of a LLaVA-style model: a Llama decoder, optionally a ViT tower and an MLP projector."""

    name: str  # label for tables
    hidden: int  # d: decoder hidden size
    intermediate: int  # m: decoder FFN size (gated Llama MLP: gate, up, down matrices)
    num_layers: int  # L: decoder layers
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when fewer than num_heads)
    vocab: int  # LM-head output size
    image_tokens: int  # N: image tokens per image in the decoder's input sequence
    head_dim: int | None = None  # per-head size; None sets hidden // num_heads
    vision: VisionArch | None = None  # vision tower; None when unknown (vision FLOPs then omitted)
    projector_layers: int = 2  # LLaVA-1.5 "mlp2x_gelu": vision_hidden -> d -> d
    image_token_id: int = 32000  # token id of an image position (LLaVA-1.5 HF checkpoints: 32000)
    family: str = "llava"  # model family (FAMILY_BUILDERS): which config class random weights are built from
    note: str = ""  # how image_tokens was counted (resolution, tiles), shown by `himap flops`

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.num_heads)
        for name in ("hidden", "intermediate", "num_layers", "num_heads", "num_kv_heads", "vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"architecture {self.name!r}: {name} must be positive, got {getattr(self, name)}")

    @property
    def d_head(self) -> int:
        return self.head_dim

    def to_llava_config(self, attn_implementation: str = "sdpa"):
        """A transformers LlavaConfig of this size (random weights can be built from it)."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        if self.vision is None:
            raise ValueError(f"architecture {self.name!r} has no vision tower sizes; cannot build a LlavaConfig")
        v = self.vision
        if v.num_patches != self.image_tokens:
            raise ValueError(f"architecture {self.name!r}: {self.image_tokens} image tokens but the tower gives "
                             f"{v.num_patches} patches; LlavaConfig uses the 'default' strategy (patches, no CLS)")
        vision = CLIPVisionConfig(hidden_size=v.hidden, intermediate_size=v.intermediate,
                                  num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                                  image_size=v.image_size, patch_size=v.patch_size, num_channels=v.channels,
                                  projection_dim=v.hidden)
        pad = min(self.image_token_id + 1, self.vocab - 1)
        text = LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                           num_key_value_heads=self.num_kv_heads, head_dim=self.d_head,
                           max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=pad,
                           rms_norm_eps=1e-5, tie_word_embeddings=False)
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=self.image_token_id,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu", image_seq_length=self.image_tokens)
        cfg._attn_implementation = attn_implementation
        return cfg

    def to_config(self, attn_implementation: str = "sdpa"):
        """A transformers config of this size and family (random weights can be built from it)."""
        if self.family == "llava":
            return self.to_llava_config(attn_implementation)
        if self.family not in FAMILY_BUILDERS:
            raise ValueError(f"architecture {self.name!r}: random weights are built for the families "
                             f"llava, {', '.join(FAMILY_BUILDERS)}; not {self.family!r}")
        cfg = FAMILY_BUILDERS[self.family](self)
        cfg._attn_implementation = attn_implementation
        return cfg

    @classmethod
    def from_config(cls, config, name: str = "model") -> "Arch":
        """Sizes read from a LLaVA-style config (`text_config` + `vision_config`) or a bare decoder
        config (then image_tokens is 0 and must be given to the count functions)."""
        text = getattr(config, "text_config", None) or config
        for attr in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if getattr(text, attr, None) is None:
                raise ValueError(f"config of {name!r} has no text_config.{attr}; not a decoder config")
        vision, image_tokens = None, 0
        vc = getattr(config, "vision_config", None)
        if vc is not None and all(getattr(vc, a, None) for a in ("image_size", "patch_size", "hidden_size",
                                                                     "intermediate_size", "num_hidden_layers")):
            vision = VisionArch(image_size=_side(vc.image_size), patch_size=_side(vc.patch_size),
                                hidden=vc.hidden_size, intermediate=vc.intermediate_size,
                                num_layers=vc.num_hidden_layers, num_heads=getattr(vc, "num_attention_heads", 1),
                                channels=getattr(vc, "num_channels", 3))
            strategy = getattr(config, "vision_feature_select_strategy", "default")
            image_tokens = vision.num_patches + (1 if strategy == "full" else 0)
        if vision is None:  # LlavaConfig.image_seq_length defaults to 576 whatever the tower: last resort
            image_tokens = getattr(config, "image_seq_length", None) or 0
        token_id = getattr(config, "image_token_id", None)
        if token_id is None:
            token_id = getattr(config, "image_token_index", -1)
        return cls(name=name, hidden=text.hidden_size, intermediate=text.intermediate_size,
                   num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
                   num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                   vocab=text.vocab_size, image_tokens=int(image_tokens),
                   head_dim=getattr(text, "head_dim", None), vision=vision,
                   image_token_id=int(token_id if token_id is not None else -1))


def _side(value) -> int:
    """image_size / patch_size may be an int or an (h, w) pair; only square sizes are supported."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square size {value!r} is not supported by the cost model")
        value = value[0]
    return int(value)


CLIP_L_336 = VisionArch(image_size=336, patch_size=14, hidden=1024, intermediate=4096, num_layers=24, num_heads=16)
"""CLIP ViT-L/14 at 336 px, LLaVA-1.5's tower: 24 x 24 = 576 patches."""

CLIP_L_336_ANYRES = VisionArch(image_size=336, patch_size=14, hidden=1024, intermediate=4096, num_layers=24,
                               num_heads=16, tiles=5)
"""LLaVA-NeXT's CLIP ViT-L/14-336 run on the base image and four crops (a 672 px image)."""


def _llama_text(arch: Arch, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                       num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
                       num_key_value_heads=arch.num_kv_heads, head_dim=arch.d_head, max_position_embeddings=8192,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, **extra)


def _llava_next_config(arch: Arch):
    """LlavaNextConfig: CLIP tower of `arch.vision`, anyres grid of 1x2, 2x1 and 2x2 tiles."""
    from transformers import CLIPVisionConfig, LlavaNextConfig

    v, s = arch.vision, arch.vision.image_size
    vision = CLIPVisionConfig(hidden_size=v.hidden, intermediate_size=v.intermediate, num_hidden_layers=v.num_layers,
                              num_attention_heads=v.num_heads, image_size=s, patch_size=v.patch_size,
                              projection_dim=v.hidden)
    return LlavaNextConfig(vision_config=vision, text_config=_llama_text(arch), image_token_index=arch.image_token_id,
                           image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
                           vision_feature_layer=-2, vision_feature_select_strategy="default")


def _qwen2_5_vl_config(arch: Arch):
    """Qwen2_5_VLConfig: ViT of `arch.vision` (merge 2, temporal patch 2), M-RoPE decoder."""
    from transformers import Qwen2_5_VLConfig

    v, hd = arch.vision, arch.d_head
    hw = (hd // 2) * 3 // 8  # Qwen2.5-VL's split of the rotary half: [16, 24, 24] for head_dim 128
    text = dict(vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
                num_key_value_heads=arch.num_kv_heads, max_position_embeddings=32768, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [hd // 2 - 2 * hw, hw, hw]})
    vision = dict(depth=v.num_layers, hidden_size=v.hidden, out_hidden_size=arch.hidden,
                  intermediate_size=v.intermediate, num_heads=v.num_heads, patch_size=v.patch_size,
                  spatial_merge_size=v.merge, temporal_patch_size=2, window_size=8 * v.patch_size,
                  fullatt_block_indexes=[v.num_layers - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=arch.image_token_id,
                            video_token_id=arch.image_token_id + 1, vision_start_token_id=arch.image_token_id + 2,
                            vision_end_token_id=arch.image_token_id + 3)


FAMILY_BUILDERS = {"llava_next": _llava_next_config, "qwen2_5_vl": _qwen2_5_vl_config}
"""Config builders of the families `himap bench --arch ... --random-weights` can instantiate."""

QWEN25_VIT = dict(patch_size=14, hidden=1280, intermediate=3420, num_layers=32, num_heads=16, merge=2,
                  cls_token=False, gated_mlp=True)
"""Qwen2.5-VL's ViT (675M): 14 px patches, 2x2 merge, SwiGLU MLP."""

ARCHS: dict[str, Arch] = {
    "llava-1.5-7b": Arch("llava-1.5-7b", hidden=4096, intermediate=11008, num_layers=32, num_heads=32,
                         num_kv_heads=32, vocab=32064, image_tokens=576, vision=CLIP_L_336),
    "llava-1.5-13b": Arch("llava-1.5-13b", hidden=5120, intermediate=13824, num_layers=40, num_heads=40,
                          num_kv_heads=40, vocab=32064, image_tokens=576, vision=CLIP_L_336),
    # Scaled-down LLaVA-1.5 for CPU benchmarks: the real 576-token image grid and vocabulary, a
    # 1024-wide 16-layer decoder (FFN ratio ~2.75 as in Llama) and a small 4-layer CLIP tower.
    "llava-tiny-cpu": Arch("llava-tiny-cpu", hidden=1024, intermediate=2816, num_layers=16, num_heads=16,
                           num_kv_heads=16, vocab=32064, image_tokens=576,
                           vision=VisionArch(image_size=336, patch_size=14, hidden=256, intermediate=1024,
                                             num_layers=4, num_heads=4)),
    "llava-next-7b": Arch("llava-next-7b", hidden=4096, intermediate=11008, num_layers=32, num_heads=32,
                          num_kv_heads=32, vocab=32064, image_tokens=2880, vision=CLIP_L_336_ANYRES,
                          family="llava_next",
                          note="2,880 image tokens = 5 x 576 (base image + 4 crops of a 672 px image; the HF "
                               "model adds 48 row-newline tokens to the crops: 2,928)"),
    "qwen2.5-vl-7b": Arch("qwen2.5-vl-7b", hidden=3584, intermediate=18944, num_layers=28, num_heads=28,
                          num_kv_heads=4, vocab=152064, image_tokens=1024, family="qwen2_5_vl",
                          image_token_id=151655,
                          vision=VisionArch(image_size=896, **QWEN25_VIT),
                          note="a 896 x 896 image: 64 x 64 patches of 14 px, merged 2 x 2 into 1,024 tokens"),
    "llava-onevision-7b": Arch("llava-onevision-7b", hidden=3584, intermediate=18944, num_layers=28, num_heads=28,
                               num_kv_heads=4, vocab=152128, image_tokens=3699, family="llava_onevision",
                               image_token_id=151646,
                               vision=VisionArch(image_size=384, patch_size=14, hidden=1152, intermediate=4304,
                                                 num_layers=26, num_heads=16, tiles=5, cls_token=False),
                               note="a 768 x 768 image: base 27 x 27 = 729 tokens + 2 x 2 crops 54 x 54 = 2,916 "
                                    "+ 54 row newlines (anyres_max_9)"),
    # Scaled-down decoders for CPU benchmarks with the real visual token counts' order (>= 2,000):
    # llava-tiny-cpu's 1024-wide 16-layer decoder (GQA 16/4 for Qwen), tiny towers.
    "llava-next-cpu": Arch("llava-next-cpu", hidden=1024, intermediate=2816, num_layers=16, num_heads=16,
                           num_kv_heads=16, vocab=32064, image_tokens=2928, family="llava_next",
                           vision=VisionArch(image_size=336, patch_size=14, hidden=64, intermediate=128,
                                             num_layers=2, num_heads=2, tiles=5),
                           note="a 672 x 672 image: 576 base + 48 x 48 crop tokens + 48 newlines"),
    "qwen2.5-vl-cpu": Arch("qwen2.5-vl-cpu", hidden=1024, intermediate=2816, num_layers=16, num_heads=16,
                           num_kv_heads=4, vocab=32064, image_tokens=2304, family="qwen2_5_vl",
                           image_token_id=32000,
                           vision=VisionArch(image_size=1344, patch_size=14, hidden=64, intermediate=128,
                                             num_layers=2, num_heads=2, merge=2, cls_token=False,
                                             gated_mlp=True),
                           note="a 1344 x 1344 image: 96 x 96 patches merged 2 x 2 into 2,304 tokens"),
}
"""Architecture presets (public config values; no weights needed). `note` says how the visual
token count was reached."""


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; presets: {', '.join(ARCHS)} (or pass --model PATH)")
    return ARCHS[name]


SYSTEM_TOKENS = {"llava-v1": 35, "hf": 5}
"""Text tokens before the image (BOS included) with LLaVA-1.5's tokenizer, per prompt format
(himap.models.loading): llava-v1 is BOS, the vicuna_v1 system prompt and "USER: " (35, the
official code's --sys-length / SYS_LEN); hf is the llava-hf chat template's BOS "USER: " (5 ids:
1, 3148, 1001, 29901, 29871, as transformers' own LLaVA processor test expects). Other models'
templates give other counts: pass them explicitly."""


@dataclass(frozen=True)
class PromptShape:
    """Token counts of one example; the defaults are a LLaVA-1.5 multiple-choice prompt in the
    official code's llava-v1 format (the format of the paper's numbers)."""

    n_system: int = 35  # S: text tokens before the image, BOS included: SYSTEM_TOKENS["llava-v1"], the official format
    n_instruction: int = 40  # I: text tokens after the image (question, options, "ASSISTANT:")
    new_tokens: int = 1  # generated tokens: the first comes from prefill, each further one from a decode step
    n_image: int | None = None  # N: image tokens; None means the architecture's image_tokens

    def __post_init__(self):
        for name in ("n_system", "n_instruction"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.new_tokens < 0:
            raise ValueError(f"new_tokens must be >= 0, got {self.new_tokens}")
        if self.n_image is not None and self.n_image < 0:
            raise ValueError(f"n_image must be >= 0, got {self.n_image}")


def _n_image(arch: Arch, shape: PromptShape) -> int:
    n = arch.image_tokens if shape.n_image is None else shape.n_image
    if n <= 0 and shape.n_image is None:
        raise ValueError(f"architecture {arch.name!r} has no image token count; give n_image (--image-tokens)")
    return n


def layer_tokens(schedule: Schedule, shape: PromptShape, arch: Arch) -> tuple[list[int], list[int]]:
    """(tokens, image tokens) entering each decoder layer during prefill, for one example.

    The single source of the per-layer counts every cost below uses: image tokens follow
    himap.prune.schedule.image_tokens_per_layer; text tokens (S and I) are never dropped. After prefill,
    layer l's KV cache holds tokens[l] entries.
    """
    images = image_tokens_per_layer(schedule, _n_image(arch, shape), arch.num_layers)
    text = shape.n_system + shape.n_instruction
    return [text + n for n in images], images


def omega(n: int, d: int, m: int) -> int:
    """Eq. (10)'s per-layer cost of n image tokens: 4nd^2 + 2n^2d + 2ndm (multiply-accumulates)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def paper_flops(arch: Arch, method: "str | Schedule", n_image: int | None = None) -> int:
    """The paper's TFLOPs column (section 4.2): sum over decoder layers of Omega(image tokens).

    For two stages this is exactly eq. (10)'s numerator K1*Omega(n) + (K2-K1)*Omega(n1) +
    (L-K2)*Omega(n2), with n1, n2 from floor-based keep counts (equal to eq. 10's for n = 576).
    """
    _, images = layer_tokens(get_schedule(method).for_layers(arch.num_layers), PromptShape(0, 0, 0, n_image), arch)
    return sum(omega(n, arch.hidden, arch.intermediate) for n in images)


def flops_reduction(arch: Arch, method: "str | Schedule", n_image: int | None = None) -> float:
    """eta of eq. (10): 1 - paper_flops(method) / paper_flops(vanilla)."""
    return 1.0 - paper_flops(arch, method, n_image) / paper_flops(arch, "vanilla", n_image)


def truncate(value: float, decimals: int = 2) -> float:
    """Truncate toward zero to `decimals` places: how the paper's tables print TFLOPs
    (2.986 -> 2.98, 1.566 -> 1.56); rounding would give 2.99 and 1.57."""
    scale = 10 ** decimals
    return math.floor(value * scale + 1e-9) / scale


def _attention_pairs(queries: int, keys: int, mode: str) -> int:
    """Query-key pairs computed when the last `queries` positions of a `keys`-long causal
    sequence attend: every pair (dense) or only the unmasked ones (causal)."""
    if mode == "dense":
        return queries * keys
    if mode == "causal":  # query i (of the last `queries`) sees keys 0 .. keys - queries + i
        return queries * (keys - queries + 1) + queries * (queries - 1) // 2
    raise ValueError(f"unknown attention mode {mode!r}; choose one of {', '.join(ATTENTION_MODES)}")


def layer_linear_flops(arch: Arch, tokens: int) -> int:
    """FLOPs of one decoder layer's matrices for `tokens` tokens: q and o (d x Hq*hd), k and v
    (d x Hkv*hd, GQA-aware), gate, up and down (d x m)."""
    d, hd = arch.hidden, arch.d_head
    q_o = 2 * d * arch.num_heads * hd
    k_v = 2 * d * arch.num_kv_heads * hd
    mlp = 3 * d * arch.intermediate
    return 2 * tokens * (q_o + k_v + mlp)


def attention_flops(arch: Arch, queries: int, keys: int, mode: str = "dense") -> int:
    """FLOPs of QK^T and AV in one layer: 2 x 2 x pairs x heads x head_dim."""
    return 4 * _attention_pairs(queries, keys, mode) * arch.num_heads * arch.d_head


RANKING_ROWS = {"phi_sh": "instruction", "phi_dp": "image", "phi_dp_row": "image", "phi_last": "last",
                "random": None, "embed_norm": None, "gradient": None, "pdrop": None, "dart": None,
                "divprune": None, "visionzip": None}
"""Query rows whose attention each criterion reads at layer K-1 (None: no attention rows; the
peers' own work is counted by `peer_selection_flops`)."""


def ranking_flops(arch: Arch, schedule: Schedule, shape: PromptShape) -> int:
    """FLOPs of the rankings at layer K-1 (SPEC section 2: only the needed rows; softmax and masks
    are elementwise and not counted), for one example as the engine computes them:
    `reduced_attention` takes the rows in chunks (`chunk_rows` at batch 1), each chunk's QK^T
    against the keys up to its last row (causal) and one matrix-vector product over its heads and
    rows (the head mean and the column or row sum); a criterion without a reduction computes its
    rows against every key. Peer criteria count their own decoder-side work
    (`peer_selection_flops`). The `gradient` criterion's backward pass is not modelled (0)."""
    from himap.prune import criteria
    from himap.prune.rows import ROW_CHUNK_BYTES, chunk_rows

    schedule = schedule.for_layers(arch.num_layers)
    tokens, images = layer_tokens(schedule, shape, arch)
    heads, total = arch.num_heads, 0
    for stage in schedule.stages:
        if RANKING_ROWS[stage.criterion] is None and stage.criterion in PEER_CRITERIA:
            total += peer_selection_flops(arch, stage, shape, tokens, images)[0]
            continue
        t, n = tokens[stage.k - 1], images[stage.k - 1]
        first = {"instruction": t - shape.n_instruction, "image": shape.n_system, "last": t - 1,
                 None: 0}[RANKING_ROWS[stage.criterion]]
        count = {"instruction": shape.n_instruction, "image": n, "last": 1, None: 0}[RANKING_ROWS[stage.criterion]]
        if stage.criterion not in criteria.REDUCTIONS:
            total += 2 * count * t * heads * arch.d_head
            continue
        step = chunk_rows(1, heads, t, ROW_CHUNK_BYTES)
        for start in range(first, first + count, step):
            rows = min(step, first + count - start)
            keys = start + rows  # the chunk's last row + 1
            total += 2 * rows * keys * heads * (arch.d_head + 1)  # QK^T, then the reduction
    return total


def vision_ranking_flops(arch: Arch, schedule: Schedule, shape: PromptShape) -> int:
    """FLOPs of criteria that select on the vision side (VisionZip), per example."""
    schedule = schedule.for_layers(arch.num_layers)
    tokens, images = layer_tokens(schedule, shape, arch)
    return sum(peer_selection_flops(arch, st, shape, tokens, images)[1] for st in schedule.stages
               if st.criterion in PEER_CRITERIA)


def peer_selection_flops(arch: Arch, stage, shape: PromptShape, tokens: list[int], images: list[int]) -> tuple[int, int]:
    """(decoder-side, vision-side) FLOPs of one peer stage's selection, as himap.prune.peers and
    the engine compute it (matrix products only, 2 per multiply-accumulate; norms, softmax, sorting
    and the greedy loops are elementwise and not counted, as in torch.utils.flop_counter):

    - pdrop: layer K's key projection for every token present and query projection for the last
      prompt token, and that row's QK^T (the official code also projects every query and value);
    - dart: cosine similarities of the pivots (image + instruction) with the image tokens, d-wide;
    - divprune: the n x n cosine matrix of the n image tokens, d-wide;
    - visionzip: the [CLS] query row against every encoder token (d_v) and the similarities of the
      merged tokens to the contextual targets (head_dim_v); per image, on the vision side.
    Other criteria: (0, 0)."""
    from himap.prune.schedule import stage_kept

    d, hd = arch.hidden, arch.d_head
    n0 = images[0] if stage.k else _n_image(arch, shape)
    n_before = images[stage.k - 1] if stage.k else n0
    t_before = tokens[stage.k - 1] if stage.k else shape.n_system + shape.n_instruction + n0
    if stage.criterion == "pdrop":
        return (2 * d * arch.num_heads * hd + 2 * t_before * d * arch.num_kv_heads * hd
                + 2 * t_before * arch.num_heads * (hd + 1)), 0  # reduced_attention: QK^T row, then the head mean
    if stage.criterion == "dart":
        kept = stage_kept(stage, n_before, n0)
        pivots = min(max(1, int(stage.option("pivot_image") * n0 + 1e-9)), kept)
        pivots += min(int(stage.option("pivot_text")), shape.n_instruction)
        return 2 * pivots * n_before * d, 0
    if stage.criterion == "divprune":
        return 2 * n_before * n_before * d, 0
    if stage.criterion == "visionzip":
        v = arch.vision
        if v is None:
            return 0, 0
        p = arch.image_tokens
        kept = stage_kept(stage, p, p)
        dominant = min(kept, int(stage.option("dominant", 0.0) * p + 1e-9))
        contextual = kept - dominant
        others = p - dominant - contextual if contextual > 0 else 0
        per_image = 2 * (v.num_patches + 1) * v.hidden + 2 * others * contextual * (v.hidden // v.num_heads)
        return 0, per_image * max(1, n0 // p)
    return 0, 0


def vision_flops(arch: Arch) -> int:
    """FLOPs of one image through the ViT tower (patch conv, every encoder layer on patches (+ CLS),
    dense attention over each tile) and the projector: LLaVA's MLP (vision_hidden -> d -> d on the
    image tokens) or Qwen's merger (merge^2 patches -> one token: 2-layer MLP then d).
    `tiles` tower passes per image (LLaVA-NeXT); Qwen2.5-VL's windowed blocks are counted as full
    attention over the image (an upper bound: most of its blocks attend within 112-pixel windows)."""
    v = arch.vision
    if v is None:
        return 0
    t = v.num_patches + (1 if v.cls_token else 0)
    mlp = (3 if v.gated_mlp else 2) * v.hidden * v.intermediate
    patch = 2 * v.num_patches * v.hidden * v.channels * v.patch_size ** 2
    layer = 2 * t * (4 * v.hidden ** 2 + mlp) + 4 * t * t * v.hidden
    if v.merge > 1:
        wide = v.hidden * v.merge ** 2
        proj = 2 * (v.num_patches // v.merge ** 2) * (wide * wide + wide * arch.hidden)
    else:
        proj = 2 * arch.image_tokens * (v.hidden * arch.hidden + (arch.projector_layers - 1) * arch.hidden ** 2)
    return v.tiles * (patch + v.num_layers * layer) + proj


@dataclass
class Cost:
    """Full FLOPs count of one example under one schedule, by part (real FLOPs, 2 per MAC)."""

    method: str  # schedule name
    tokens_per_layer: list[int]  # tokens entering each decoder layer in prefill (= KV length after prefill)
    image_tokens_per_layer: list[int]  # image tokens entering each decoder layer
    prefill_linear: int  # decoder projections + MLP over the prompt
    prefill_attention: int  # decoder QK^T + AV over the prompt
    ranking: int  # QK^T rows recomputed by the pruning stages
    lm_head_prefill: int  # the LM-head row of the first generated token (generate keeps 1 logit row)
    decode_linear: int  # decoder projections + MLP of the new_tokens - 1 decode steps
    decode_attention: int  # decode steps attending to the (pruned) KV cache
    lm_head_decode: int  # the LM-head rows of the decode steps
    vision: int  # vision tower + projector (one image)
    vision_ranking: int  # selection work of a criterion on the vision side (VisionZip), 0 otherwise
    paper: int  # paper convention (image tokens only, MACs), for reference
    kv_cache_bytes: int  # KV cache after prefill
    kv_cache_bytes_final: int  # KV cache after the last decode step (new_tokens - 1 more entries per layer)
    attention: str = "dense"  # how prefill attention pairs were counted (ATTENTION_MODES)

    @property
    def prefill(self) -> int:
        """Decoder prefill: layers, ranking and the first token's LM-head row (no vision)."""
        return self.prefill_linear + self.prefill_attention + self.ranking + self.lm_head_prefill

    @property
    def decode(self) -> int:
        """All decode steps: layers on one token each, attention to the cache, LM-head rows."""
        return self.decode_linear + self.decode_attention + self.lm_head_decode

    @property
    def decoder(self) -> int:
        """Everything the decoder and LM head do for the example: prefill + decode."""
        return self.prefill + self.decode

    @property
    def vision_side(self) -> int:
        """Vision tower + projector + vision-side selection."""
        return self.vision + self.vision_ranking

    @property
    def total(self) -> int:
        """Decoder + vision tower + projector + vision-side selection."""
        return self.decoder + self.vision_side

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(prefill=self.prefill, decode=self.decode, decoder=self.decoder, vision_side=self.vision_side,
                   total=self.total)
        return out


def kv_cache_bytes(arch: Arch, lengths: list[int], dtype: str = "fp16", batch: int = 1) -> int:
    """Bytes of a KV cache with `lengths[l]` entries in layer l: sum(len) x 2 x kv_heads x head_dim x bytes."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    return batch * sum(lengths) * 2 * arch.num_kv_heads * arch.d_head * DTYPE_BYTES[dtype]


def full_cost(arch: Arch, method: "str | Schedule", shape: PromptShape = PromptShape(),
              attention: str = "dense", dtype: str = "fp16") -> Cost:
    """Every FLOP of one example's matrix products under `method` (see the module docstring).

    Prefill: layer l runs on tokens[l] tokens. Generation makes `new_tokens` tokens: the first from
    the prefill logits (one LM-head row), each further one from a decode step where every layer
    runs one token that attends to its cache (tokens[l] + steps so far + itself).
    """
    schedule = get_schedule(method).for_layers(arch.num_layers)
    tokens, images = layer_tokens(schedule, shape, arch)
    steps = max(shape.new_tokens - 1, 0)  # decode steps
    lm_row = 2 * arch.hidden * arch.vocab
    return Cost(
        method=schedule.name, tokens_per_layer=tokens, image_tokens_per_layer=images,
        prefill_linear=sum(layer_linear_flops(arch, t) for t in tokens),
        prefill_attention=sum(attention_flops(arch, t, t, attention) for t in tokens),
        ranking=ranking_flops(arch, schedule, shape),
        lm_head_prefill=lm_row if shape.new_tokens >= 1 else 0,
        decode_linear=steps * sum(layer_linear_flops(arch, 1) for _ in tokens),
        decode_attention=sum(attention_flops(arch, 1, t + j) for t in tokens for j in range(1, steps + 1)),
        lm_head_decode=steps * lm_row,
        vision=vision_flops(arch), vision_ranking=vision_ranking_flops(arch, schedule, shape),
        paper=sum(omega(n, arch.hidden, arch.intermediate) for n in images),
        kv_cache_bytes=kv_cache_bytes(arch, tokens, dtype),
        kv_cache_bytes_final=kv_cache_bytes(arch, [t + steps for t in tokens], dtype),
        attention=attention,
    )


def uncached_cost(arch: Arch, method: "str | Schedule", shape: PromptShape = PromptShape(),
                  attention: str = "dense", dtype: str = "fp16") -> Cost:
    """Every FLOP of one example generated as the official code generates (use_cache=False):
    step t (0 .. new_tokens-1) runs the vision tower and the whole decoder again on the prompt
    plus the t tokens generated so far, which join the instruction tokens (ranking included).

    The prefill fields and `vision` are step 0's (the same as full_cost's); the decode fields
    hold steps 1 .. new_tokens-1: their linear layers, vision-tower runs, vision-side selections
    (VisionZip) and rankings in `decode_linear`, their attention in `decode_attention`. No KV cache
    is kept (0 bytes)."""
    import dataclasses

    schedule = get_schedule(method)
    steps = [full_cost(arch, schedule, dataclasses.replace(shape, n_instruction=shape.n_instruction + t,
                                                           new_tokens=1), attention, dtype)
             for t in range(max(shape.new_tokens, 1))]
    first, later = steps[0], steps[1:]
    return dataclasses.replace(
        first, decode_linear=sum(c.prefill_linear + c.vision + c.vision_ranking + c.ranking for c in later),
        decode_attention=sum(c.prefill_attention for c in later),
        lm_head_decode=sum(c.lm_head_prefill for c in later), kv_cache_bytes=0, kv_cache_bytes_final=0)
