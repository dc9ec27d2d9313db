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
  holds, the ranking rows of each stage, the LM head of each generated token, and the decode
  steps attending to the pruned KV cache. Optionally the vision tower and projector.
  Elementwise work (norms, RoPE, softmax, activations) is not counted, as in flop_counter.

Architecture presets come from public configs and need no weights; `Arch.from_config` reads any
LLaVA-style config (text_config / vision_config), and `Arch.to_llava_config` builds a LlavaConfig
of that size so a random model can be instantiated for benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from himap.prune.schedule import Schedule, get_schedule, image_tokens_per_layer

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
}
"""Architecture presets (public config values; no weights needed)."""


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; presets: {', '.join(ARCHS)} (or pass --model PATH)")
    return ARCHS[name]


@dataclass(frozen=True)
class PromptShape:
    """Token counts of one example; the defaults are a LLaVA-1.5 multiple-choice prompt."""

    n_system: int = 35  # S: text tokens before the image, BOS included (LLaVA-1.5's system prompt + "USER:")
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
    _, images = layer_tokens(get_schedule(method), PromptShape(0, 0, 0, n_image), arch)
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
                "random": None, "embed_norm": None, "gradient": None}
"""Query rows whose attention each criterion reads at layer K-1 (None: no attention rows)."""


def ranking_flops(arch: Arch, schedule: Schedule, shape: PromptShape) -> int:
    """FLOPs of the rankings: each stage recomputes QK^T for its query rows against every key of
    layer K-1 (SPEC section 2: only the needed rows, softmax and head mean are elementwise).
    The `gradient` criterion's backward pass is not modelled (counted as 0)."""
    tokens, images = layer_tokens(schedule, shape, arch)
    total = 0
    for stage in schedule.stages:
        rows = {"instruction": shape.n_instruction, "image": images[stage.k - 1], "last": 1,
                None: 0}[RANKING_ROWS[stage.criterion]]
        total += 2 * rows * tokens[stage.k - 1] * arch.num_heads * arch.d_head
    return total


def vision_flops(arch: Arch) -> int:
    """FLOPs of one image through the ViT tower (patch conv, every encoder layer on patches + CLS,
    dense attention) and the LLaVA projector (vision_hidden -> d -> d on the image tokens)."""
    v = arch.vision
    if v is None:
        return 0
    t = v.num_patches + 1
    patch = 2 * v.num_patches * v.hidden * v.channels * v.patch_size ** 2
    layer = 2 * t * (4 * v.hidden ** 2 + 2 * v.hidden * v.intermediate) + 4 * t * t * v.hidden
    proj = 2 * arch.image_tokens * (v.hidden * arch.hidden + (arch.projector_layers - 1) * arch.hidden ** 2)
    return patch + v.num_layers * layer + proj


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
    def total(self) -> int:
        """Decoder + vision tower + projector."""
        return self.decoder + self.vision

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(prefill=self.prefill, decode=self.decode, decoder=self.decoder, total=self.total)
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
    schedule = get_schedule(method)
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
        vision=vision_flops(arch), paper=sum(omega(n, arch.hidden, arch.intermediate) for n in images),
        kv_cache_bytes=kv_cache_bytes(arch, tokens, dtype),
        kv_cache_bytes_final=kv_cache_bytes(arch, [t + steps for t in tokens], dtype),
        attention=attention,
    )
