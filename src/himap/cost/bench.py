"""Latency and memory benchmark of pruning methods, interleaved in one process (paper section 5.2).

Per repetition every method runs once, round-robin (the starting method rotates each round), so
slow drifts of a shared machine hit all methods alike; ratios are computed per round and their
median reported, next to medians and min-max of the raw times. Each run of a method is one
`model.generate(max_new_tokens=G)` call with a logits processor stamping the clock at each step:

- time to first token (TTFT): the prefill (vision tower, decoder with pruning and ranking, one
  logit row) plus generate's small setup; the benchmark's prefill time;
- decode time per token: (last stamp - first stamp) / (G - 1), steps attending to the pruned cache;
- end-to-end time per example (the paper's latency metric, with a short answer);
- the share of TTFT spent ranking (`handle.stats.ranking_seconds`, which also covers selecting
  and gathering the kept tokens);
- the KV cache, measured from the cache object generate returns (bytes and per-layer lengths; the
  prefill part is the final length minus the G - 1 decode entries);
- peak memory: CUDA `max_memory_allocated` during generate (absolute and above the weights).
  On CPU there is no per-method peak (tracemalloc misses torch's allocator; ru_maxrss is a
  process-lifetime high-water mark), so the process's ru_maxrss is reported once, labelled as such,
  with the measured and analytic KV-cache sizes.

With `uncached`, every method also runs as the official HiMAP code generates (use_cache=False:
each new token re-runs the vision tower and the whole sequence, ranking again), labelled
"<method>/nocache"; its decode time per token is one such full recompute, and its analytic cost
is himap.cost.flops.uncached_cost.

CUDA timings synchronise the device around every clock read. Vanilla runs the unmodified model;
other methods run under `himap.pruned`. The input is synthetic: [BOS, system, N image tokens,
instruction] with random ids and random pixel values; with random weights eos is disabled so every
method generates exactly G tokens.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import asdict, dataclass

from himap.cost.flops import PromptShape

_SHAPE = PromptShape()


@dataclass
class BenchConfig:
    """What to run; the CLI's flags and defaults come from here."""

    methods: tuple = ("vanilla", "fastv", "himap")  # method names or Schedules, run round-robin
    reps: int = 5  # measured rounds (each runs every method once)
    warmup: int = 1  # unmeasured rounds first
    n_system: int = _SHAPE.n_system  # text tokens before the image, BOS included
    n_instruction: int = _SHAPE.n_instruction  # text tokens after the image
    new_tokens: int = 8  # generated tokens per example (a short answer)
    batch_size: int = 1  # examples per call (all the same length: no padding)
    seed: int = 0  # seed of the synthetic ids and pixels
    uncached: bool = False  # also run every method without KV cache ("<method>/nocache"), as the official code

    def __post_init__(self):
        if self.reps < 1 or self.warmup < 0:
            raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={self.reps} warmup={self.warmup}")
        if self.new_tokens < 2:
            raise ValueError("new_tokens must be >= 2 to time decode steps")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.methods:
            raise ValueError("no methods to benchmark")


# ----------------------------------------------------------------------------- model and inputs

def random_model(arch, device: str = "cpu", dtype=None, attn_implementation: str = "sdpa", seed: int = 0):
    """A model of `arch`'s family and size with random weights, built on `device`; `model._himap_arch`
    keeps `arch` (its visual token count and tower) for the synthetic inputs and the cost model."""
    import torch
    from transformers import AutoModelForImageTextToText

    from himap.models.loading import _dtype

    torch.manual_seed(seed)
    dtype = _dtype(dtype) or torch.float32
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(arch.to_config(attn_implementation), dtype=dtype)
    model.eval()
    model._himap_arch = arch
    disable_eos(model)
    return model


def disable_eos(model) -> None:
    """Random weights: no eos, so every method generates max_new_tokens tokens."""
    gc = model.generation_config
    gc.eos_token_id = None
    if gc.pad_token_id is None:
        gc.pad_token_id = getattr(model.config.text_config, "pad_token_id", None) or 0


def synthetic_inputs(model, n_system: int, n_instruction: int, batch_size: int = 1, seed: int = 0) -> dict:
    """[BOS, system..., image * N, instruction...] per row (no padding) and random pixel values.

    N comes from the model's vision config; text ids are random, avoiding ids 0-2 and the image id.
    """
    import torch

    from himap.cost.flops import Arch
    from himap.prune.adapters import find_adapter

    arch = getattr(model, "_himap_arch", None) or Arch.from_config(model.config)
    if arch.family != "llava":
        return _family_inputs(model, arch, n_system, n_instruction, batch_size, seed)
    if arch.vision is None or arch.image_tokens <= 0:
        raise ValueError("synthetic inputs need a model with a fixed-size vision tower (LLaVA-1.5 style)")
    if n_system < 1:
        raise ValueError("n_system counts BOS and must be >= 1")
    image_id = find_adapter(model).image_token_id(model)
    bos = getattr(model.config.text_config, "bos_token_id", None)
    g = torch.Generator().manual_seed(seed)

    def text(n):
        ids = torch.randint(3, arch.vocab, (batch_size, n), generator=g)
        return torch.where(ids == image_id, 3 if image_id != 3 else 4, ids)

    first = torch.full((batch_size, 1), 1 if bos is None else bos)
    ids = torch.cat([first, text(n_system - 1), torch.full((batch_size, arch.image_tokens), image_id),
                     text(n_instruction)], dim=1)
    v = arch.vision
    pixels = torch.randn((batch_size, v.channels, v.image_size, v.image_size), generator=g)
    device, dtype = model.device, next(model.parameters()).dtype
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device=device, dtype=dtype)}


def _family_inputs(model, arch, n_system: int, n_instruction: int, batch_size: int, seed: int) -> dict:
    """Synthetic inputs of a square image of `arch.vision.image_size` pixels (Qwen2.5-VL) or of twice
    the tile size (LLaVA-NeXT: base + 2 x 2 crops) with exactly `arch.image_tokens` visual tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    v, n = arch.vision, arch.image_tokens
    image_id = arch.image_token_id
    text = lambda k: torch.randint(3, min(arch.vocab, image_id), (batch_size, k), generator=g)  # noqa: E731
    first = torch.ones((batch_size, 1), dtype=torch.long)  # BOS
    if arch.family == "qwen2_5_vl":
        side = v.image_size // v.patch_size  # patches per side
        if (side // v.merge) ** 2 != n:
            raise ValueError(f"architecture {arch.name!r}: {n} visual tokens but a {v.image_size} px image gives "
                             f"{(side // v.merge) ** 2}")
        start, end = torch.full((batch_size, 1), image_id + 2), torch.full((batch_size, 1), image_id + 3)
        ids = torch.cat([first, text(n_system - 2), start, torch.full((batch_size, n), image_id), end,
                         text(n_instruction - 1)], dim=1)
        types = (ids == image_id).long()
        pixels = torch.randn((batch_size * side * side, v.channels * 2 * v.patch_size ** 2), generator=g)
        extra = {"image_grid_thw": torch.tensor([[1, side, side]] * batch_size), "mm_token_type_ids": types}
    elif arch.family == "llava_next":
        g_side = v.image_size // v.patch_size
        count = g_side ** 2 + (2 * g_side) ** 2 + 2 * g_side  # base + unpadded 2x2 crops + row newlines
        if count != n:
            raise ValueError(f"architecture {arch.name!r}: {n} visual tokens but a {2 * v.image_size} px image "
                             f"gives {count}")
        ids = torch.cat([first, text(n_system - 1), torch.full((batch_size, n), image_id), text(n_instruction)], 1)
        pixels = torch.randn((batch_size, 5, v.channels, v.image_size, v.image_size), generator=g)
        extra = {"image_sizes": torch.tensor([[2 * v.image_size, 2 * v.image_size]] * batch_size)}
    else:
        raise ValueError(f"no synthetic inputs for the {arch.family} family")
    device, dtype = model.device, next(model.parameters()).dtype
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device=device, dtype=dtype), **{k: t.to(device) for k, t in extra.items()}}


# ----------------------------------------------------------------------------- one run

def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def _clock(device) -> float:
    _sync(device)
    return time.perf_counter()


class _StepClock:
    """A logits processor that records the wall and process CPU time of each generation step."""

    def __init__(self, device):
        self.device, self.stamps, self.cpu_stamps = device, [], []

    def __call__(self, input_ids, scores):
        self.stamps.append(_clock(self.device))
        self.cpu_stamps.append(time.process_time())
        return scores


def kv_cache_size(cache) -> tuple[int, list[int]]:
    """(bytes, per-layer lengths) of a transformers cache, read from its tensors."""
    total, lengths = 0, []
    for layer in cache.layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or not hasattr(k, "numel"):
            lengths.append(0)
            continue
        total += k.numel() * k.element_size() + v.numel() * v.element_size()
        lengths.append(int(k.shape[-2]))
    return total, lengths


UNCACHED_SUFFIX = "/nocache"
"""Label suffix of a method run without KV cache (BenchConfig.uncached)."""


def run_once(model, inputs: dict, schedule, new_tokens: int, use_cache: bool = True) -> dict:
    """One `generate` call of `schedule` (vanilla: the unmodified model), timed step by step;
    use_cache=False generates as the official code (every step re-runs the whole sequence)."""
    import torch
    from transformers import LogitsProcessorList

    from himap.prune import engine

    device = model.device
    cuda = device.type == "cuda"
    out = {}
    with engine.maybe_pruned(model, schedule, sync_timing=cuda) as handle, torch.no_grad():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base_mem = torch.cuda.memory_allocated(device)
        step_clock = _StepClock(device)
        t0, c0 = _clock(device), time.process_time()
        result = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                logits_processor=LogitsProcessorList([step_clock]), return_dict_in_generate=True,
                                use_cache=use_cache)
        t_end, c_end = _clock(device), time.process_time()
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            out["peak_memory_bytes"], out["peak_memory_above_weights_bytes"] = peak, peak - base_mem
        out["ranking_s"] = handle.stats.ranking_seconds if handle is not None else 0.0
        out["check_s"] = handle.stats.check_seconds if handle is not None else 0.0
    stamps = step_clock.stamps
    n_new = result.sequences.shape[1] - inputs["input_ids"].shape[1]
    if n_new != new_tokens or len(stamps) != new_tokens:
        raise RuntimeError(f"generate made {n_new} tokens ({len(stamps)} steps), expected {new_tokens}; "
                           "is eos disabled (random weights) or min_new_tokens honoured?")
    # the returned cache: field `cache` (5.24) or `past_key_values` (5.23); None without KV cache
    field = "cache" if "cache" in {f.name for f in dataclasses.fields(result)} else "past_key_values"
    cache = getattr(result, field)
    final_bytes, final_lengths = kv_cache_size(cache) if cache is not None else (0, [])
    steps = new_tokens - 1  # the last generated token is never fed back, so the cache grew by G - 1
    out["kv_cache_lengths"] = [n - steps for n in final_lengths]
    out["kv_cache_bytes"] = final_bytes * sum(out["kv_cache_lengths"]) // max(sum(final_lengths), 1)
    out["kv_cache_bytes_final"] = final_bytes
    out["ttft_s"] = stamps[0] - t0
    out["decode_s_per_token"] = (stamps[-1] - stamps[0]) / steps
    out["e2e_s"] = t_end - t0
    out["ttft_cpu_s"] = step_clock.cpu_stamps[0] - c0
    out["e2e_cpu_s"] = c_end - c0
    del result
    return out


# ----------------------------------------------------------------------------- the benchmark

TIMES = ("ttft_s", "decode_s_per_token", "e2e_s", "ttft_cpu_s", "e2e_cpu_s")
"""Timings per run; TTFT is the prefill (vision tower, decoder with pruning, first logit row).
The *_cpu_s are the process's CPU time (all threads) over the same spans: on a shared CPU they
show the work done, unaffected by waiting for a core (with --threads 1 they are the cleanest
comparison; with more threads they include OpenMP spin-waiting)."""


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(records: list[dict], names: list[str], costs: dict) -> dict:
    """Medians, min-max, per-round ratios to vanilla and FastV, ranking share, analytic ratios."""
    by = {n: [r for r in records if r["method"] == n] for n in names}
    rounds = sorted({r["rep"] for r in records})
    at = {(r["method"], r["rep"]): r for r in records}

    def per_round_ratio(ref: str, name: str, key: str) -> float | None:
        if ref not in by:
            return None
        vals = [at[(ref, k)][key] / at[(name, k)][key] for k in rounds if (ref, k) in at and (name, k) in at]
        return statistics.median(vals) if vals else None

    methods = {}
    for n in names:
        rs = by[n]
        m = {key: _spread([r[key] for r in rs]) for key in TIMES}
        m["ranking_share_of_prefill"] = statistics.median(r["ranking_s"] / r["ttft_s"] for r in rs)
        m["check_share_of_prefill"] = statistics.median(r.get("check_s", 0.0) / r["ttft_s"] for r in rs)
        m["kv_cache_bytes"] = rs[0]["kv_cache_bytes"]
        m["kv_cache_bytes_final"] = rs[0]["kv_cache_bytes_final"]
        m["kv_cache_lengths"] = rs[0]["kv_cache_lengths"]
        if "peak_memory_bytes" in rs[0]:
            m["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in rs)
            m["peak_memory_above_weights_bytes"] = max(r["peak_memory_above_weights_bytes"] for r in rs)
        for ref in ("vanilla", "fastv"):
            m[f"speedup_vs_{ref}"] = {key: per_round_ratio(ref, n, key) for key in TIMES}
        c, v = costs[n], costs.get("vanilla")
        m["analytic"] = {"paper_tflops": c.paper / 1e12, "prefill_tflops": c.prefill / 1e12,
                         "prefill_with_vision_tflops": (c.prefill + c.vision_side) / 1e12,
                         "total_tflops": c.total / 1e12, "kv_cache_bytes_per_example": c.kv_cache_bytes}
        if v is not None:
            m["analytic"].update(
                paper_speedup=v.paper / c.paper if c.paper else None,
                prefill_speedup=v.prefill / c.prefill,
                prefill_with_vision_speedup=(v.prefill + v.vision_side) / (c.prefill + c.vision_side),
                total_speedup=v.total / c.total)
            measured = m["speedup_vs_vanilla"]["ttft_s"]
            m["prefill_speedup_vs_analytic"] = {
                "full_with_vision": measured / m["analytic"]["prefill_with_vision_speedup"],
                "full_decoder_only": measured / m["analytic"]["prefill_speedup"],
                "paper_convention": measured / m["analytic"]["paper_speedup"] if c.paper else None,
            }
        methods[n] = m
    return methods


def run_benchmark(model, config: BenchConfig, jsonl_path: str | None = None, progress: bool = True,
                  arch_name: str | None = None) -> dict:
    """Run `config` on `model`; append one JSON line per run to `jsonl_path`; return the summary.

    Not resumable on purpose: ratios are only meaningful between runs of the same process, so a
    rerun starts over (records of earlier runs stay in the file under their own run id).
    """
    import resource

    import torch
    from tqdm import tqdm

    from himap.cost.flops import Arch, PromptShape, full_cost, uncached_cost
    from himap.prune.schedule import get_schedule

    schedules = [get_schedule(m) for m in config.methods]
    if len({s.name for s in schedules}) != len(schedules):
        raise ValueError(f"method names must be distinct, got {[s.name for s in schedules]}")
    arch = getattr(model, "_himap_arch", None) or Arch.from_config(model.config, name=arch_name or type(model).__name__)
    for s in schedules:
        s.validate_for(arch.num_layers)
    variants = [(s.name, s, True) for s in schedules]  # (label, schedule, use_cache)
    if config.uncached:
        variants += [(s.name + UNCACHED_SUFFIX, s, False) for s in schedules]
    names = [v[0] for v in variants]
    inputs = synthetic_inputs(model, config.n_system, config.n_instruction, config.batch_size, config.seed)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[next(model.parameters()).dtype]
    shape = PromptShape(config.n_system, config.n_instruction, config.new_tokens)
    costs = {name: (full_cost if cached else uncached_cost)(arch, s, shape, dtype=dtype_name)
             for name, s, cached in variants}
    run_id = time.strftime("%Y%m%d-%H%M%S")
    device = model.device
    header = {"kind": "config", "run_id": run_id, "arch": arch.name, "device": str(device), "dtype": dtype_name,
              "threads": torch.get_num_threads(), "config": {**asdict(config), "methods": names}}
    records = []
    sink = open(jsonl_path, "a") if jsonl_path else None
    try:
        if sink:
            sink.write(json.dumps(header) + "\n")
            sink.flush()
        total = (config.warmup + config.reps) * len(variants)
        bar = tqdm(total=total, desc="bench", disable=not progress)
        for rnd in range(config.warmup + config.reps):
            shift = rnd % len(variants)
            for name, s, cached in variants[shift:] + variants[:shift]:  # rotate the starting method each round
                rec = run_once(model, inputs, s, config.new_tokens, use_cache=cached)
                bar.update(1)
                if rnd < config.warmup:
                    continue
                rec = {"kind": "run", "run_id": run_id, "method": name, "rep": rnd - config.warmup, **rec}
                records.append(rec)
                if sink:
                    sink.write(json.dumps(rec) + "\n")
                    sink.flush()
        bar.close()
        summary = {**header, "kind": "summary", "methods": summarize(records, names, costs)}
        if device.type == "cpu":
            summary["process_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            summary["memory_note"] = ("CPU: no per-method peak memory; process_max_rss_bytes is the whole "
                                      "process's high-water mark; compare the measured kv_cache_bytes")
        if sink:
            sink.write(json.dumps(summary) + "\n")
    finally:
        if sink:
            sink.close()
    return summary


def format_summary(summary: dict) -> str:
    """A table: medians (min-max) in ms, speedups vs vanilla and FastV, analytic speedups."""
    w = max([14] + [len(name) for name in summary["methods"]])  # method column width
    lines = [f"{summary['arch']} on {summary['device']} ({summary['dtype']}, {summary['threads']} threads), "
             f"batch {summary['config']['batch_size']}, prompt {summary['config']['n_system']} system + image + "
             f"{summary['config']['n_instruction']} instruction tokens, {summary['config']['new_tokens']} new tokens, "
             f"{summary['config']['reps']} reps",
             f"{'method':<{w}} {'TTFT ms (min-max)':<23} {'decode ms/tok':>13} {'e2e ms (min-max)':<23}"
             f" {'x prefill':>9} {'(cpu)':>6} {'x e2e':>6} {'x vs FastV':>10} {'FLOPs x (full/paper)':>21} {'rank %':>7}"
             f" {'check %':>8} {'KV MiB':>7}"]
    for name, m in summary["methods"].items():
        ms = lambda key: m[key]["median"] * 1e3  # noqa: E731
        span = lambda key: f"{ms(key):.1f} ({m[key]['min'] * 1e3:.0f}-{m[key]['max'] * 1e3:.0f})"  # noqa: E731
        sv, sf, a = m["speedup_vs_vanilla"], m["speedup_vs_fastv"], m["analytic"]
        x = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        flops = f"{x(a.get('prefill_with_vision_speedup'))}/{x(a.get('paper_speedup'))}"
        lines.append(
            f"{name:<{w}} {span('ttft_s'):<23} {ms('decode_s_per_token'):>13.2f} {span('e2e_s'):<23}"
            f" {x(sv['ttft_s']):>9} {x(sv['ttft_cpu_s']):>6} {x(sv['e2e_s']):>6} {x(sf['ttft_s']):>10} {flops:>21}"
            f" {m['ranking_share_of_prefill'] * 100:>6.2f}% {m['check_share_of_prefill'] * 100:>7.3f}%"
            f" {m['kv_cache_bytes'] / 2 ** 20:>7.1f}")
    lines.append("x prefill: TTFT speedup in wall time (cpu: in process CPU time); x: median of per-round ratios "
                 "(same process); FLOPs x: analytic prefill speedup, full count with vision / paper convention; "
                 "rank %: ranking share of TTFT; check %: himap's run-time invariant checks over the whole "
                 "generate call (prefill and every decode step) as a share of TTFT.")
    if "process_max_rss_bytes" in summary:
        lines.append(f"memory: {summary['memory_note']} (max RSS {summary['process_max_rss_bytes'] / 2 ** 30:.2f} GiB)")
    else:
        lines.append("peak memory (GiB): " + ", ".join(
            f"{n} {m['peak_memory_bytes'] / 2 ** 30:.2f}" for n, m in summary["methods"].items()))
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    """Latency (median prefill and end-to-end) against analytic FLOPs (full count), one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label, marker in (("ttft_s", "prefill (TTFT)", "o"), ("e2e_s", "end-to-end", "s")):
        xs, ys = [], []
        for name, m in summary["methods"].items():
            xs.append(m["analytic"]["prefill_with_vision_tflops"] if key == "ttft_s" else m["analytic"]["total_tflops"])
            ys.append(m[key]["median"] * 1e3)
            ax.annotate(name, (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.plot(xs, ys, marker=marker, linestyle="", label=label)
    ax.set_xlabel("analytic TFLOPs per example (full count)")
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"{summary['arch']} on {summary['device']} ({summary['dtype']}, {summary['threads']} threads)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
