"""Attention disruption: block a visual information flow at chosen layers (paper sections
3.2-3.3, appendix D; SPEC section 4).

A flow is a set of (query row, key column) entries of the attention matrix whose pre-softmax
scores are set to -inf in the blocked layers:
- img2ins: rows I (instruction), columns V (image): visual-textual flow;
- img2img: rows V, columns V: intra-visual flow;
- img2rnd: columns V, rows a seeded random set of |I| non-system positions (the control).
Columns are always image tokens, so every row keeps its system tokens and softmax stays
defined. Only the layers asked for are blocked (the official code's mask alias made a block
persist into every later layer; `from_layer_on` asks for that explicitly).

Everything is measured on one forward of the prompt: the first answer token. Per condition:
- label consistency: the top-1 token after disruption equals the one before;
- score consistency: Jaccard similarity of the top-5 token ids before and after;
- E = S - S_hat: correct first tokens before minus after (appendix D);
- D = log(E_vv / E_vt) per window (eq. 7), None when a count is not positive (log undefined).

The official code (src/HiMAP/validate/attn_disruption.py) defines label consistency otherwise:
it generates 8 tokens under the block with use_cache=False, so every step re-runs the whole
sequence with the block rebuilt over it (the generated tokens join the instruction rows), and
counts a sample consistent when the ground-truth label (e.g. "A") appears in the decoded,
stripped output. `official_tokens` > 0 computes that next to ours ("label_consistency_official").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLOWS = ("img2ins", "img2img", "img2rnd")
"""Blockable flows (SPEC section 4)."""

OFFICIAL_TOKENS = 8
"""Tokens the official disruption script generates under each block (max_new_tokens=8)."""

REFERENCES = {
    "paper": {"official_tokens": 0, "from_layer_on": False, "prompt_format": "hf"},
    "official": {"official_tokens": OFFICIAL_TOKENS, "from_layer_on": True, "prompt_format": "llava-v1"},
}
"""The disruption choices of the paper's description (with himap's default prompt) and of the
official code (its mask alias blocks from the layer on; docs/official-code.md); the CLI's
--reference picks one set, single flags override it."""


@dataclass
class DisruptConfig:
    """Which flows are blocked where, and how the effect is scored."""

    flows: tuple[str, ...] = FLOWS  # flows to block, each on its own in every window
    windows: str = "first:5,last:5,every:2"  # layer windows (see parse_windows); figures 4 and 5
    from_layer_on: bool = False  # block from each window's first layer to the last layer
    seed: int = 0  # seed of img2rnd's random rows (combined with each sample's id by the CLI)
    top_k: int = 5  # top-k ids compared by score consistency
    official_tokens: int = 0  # > 0: also generate this many tokens under each block (no KV cache, block
    #   rebuilt over the grown sequence) and score the official label consistency; the official code uses 8


@dataclass(frozen=True)
class Window:
    """A set of decoder layers blocked together."""

    name: str  # e.g. "first5", "last5", "2-3", "7", "from4"
    layers: tuple[int, ...]  # 0-based, ascending


def parse_windows(spec: str, num_layers: int, from_layer_on: bool = False) -> list[Window]:
    """Windows from a comma-separated spec over `num_layers` decoder layers (0-based):

    first:N (layers 0..N-1), last:N (the last N layers), every:N (consecutive windows of N
    layers covering the model, figure 5 uses every:2), each (every single layer), a-b (layers a
    to b inclusive), a (layer a). With from_layer_on each window becomes "its first layer to the
    last layer". Duplicate windows are dropped; the order of the spec is kept.
    """
    windows: list[Window] = []

    def add(name: str, layers):
        layers = tuple(layers)
        bad = [l for l in layers if not 0 <= l < num_layers]
        if not layers or bad:
            raise ValueError(f"window {name!r} is outside the model's {num_layers} layers (0..{num_layers - 1})")
        if from_layer_on:
            name, layers = f"from{layers[0]}", tuple(range(layers[0], num_layers))
        if all(w.layers != layers for w in windows):
            windows.append(Window(name, layers))

    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            if part.startswith(("first:", "last:", "every:")):
                kind, n = part.split(":")
                n = int(n)
                if n < 1:
                    raise ValueError
                if kind == "first":
                    add(f"first{n}", range(min(n, num_layers)))
                elif kind == "last":
                    add(f"last{n}", range(max(0, num_layers - n), num_layers))
                else:
                    for lo in range(0, num_layers, n):
                        hi = min(lo + n, num_layers) - 1
                        add(f"{lo}-{hi}" if hi > lo else str(lo), range(lo, hi + 1))
            elif part == "each":
                for l in range(num_layers):
                    add(str(l), [l])
            elif "-" in part:
                lo, hi = (int(x) for x in part.split("-"))
                if hi < lo:
                    raise ValueError
                add(part, range(lo, hi + 1))
            else:
                add(part, [int(part)])
        except ValueError as err:
            if "outside" in str(err):
                raise
            raise ValueError(f"bad window {part!r}: use first:N, last:N, every:N, each, a-b or a") from None
    if not windows:
        raise ValueError(f"no windows in {spec!r}")
    return windows


def random_rows(candidates, size: int, seed: int):
    """[T] bool: `size` positions drawn without replacement from the True entries of
    `candidates` [T], reproducibly from `seed`."""
    import torch

    pos = candidates.nonzero().squeeze(1)  # [n]
    if size > pos.numel():
        raise ValueError(f"cannot draw {size} random rows from {pos.numel()} candidates")
    g = torch.Generator().manual_seed(int(seed))
    pick = pos[torch.randperm(pos.numel(), generator=g)[:size].to(pos.device)]
    rows = torch.zeros_like(candidates)
    rows[pick] = True
    return rows


def flow_block(sets, flow: str, seeds=None):
    """[B, T, T] bool: the (query, key) entries a flow blocks, for token sets [B, T].

    seeds: per-sample seeds of img2rnd's random rows (an int gives sample b the seed int + b).
    """
    import torch

    if flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}; choose from {', '.join(FLOWS)}")
    cols = sets.image  # [B, T]
    if flow == "img2ins":
        rows = sets.instruction
    elif flow == "img2img":
        rows = sets.image
    else:
        n = sets.image.shape[0]
        seeds = 0 if seeds is None else seeds
        seeds = [seeds + b for b in range(n)] if isinstance(seeds, int) else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} samples")
        candidates = sets.valid & ~sets.system  # [B, T] non-system positions
        rows = torch.stack([random_rows(candidates[b], int(sets.instruction[b].sum()), seeds[b])
                            for b in range(n)])
    return rows[:, :, None] & cols[:, None, :]  # [B, T, T]


def disrupted_logits(model, inputs: dict, blocks: dict):
    """Logits [B, V] at the last prompt position with `blocks` ({layer: bool [B, T, T]})."""
    import torch

    from himap.analysis.probe import probed
    from himap.analysis.saliency import last_logits

    with torch.no_grad(), probed(model, blocks=blocks):
        return last_logits(model, inputs)


def blocked_greedy(model, inputs: dict, first_logits, blocks_for, n_tokens: int) -> list[list[int]]:
    """Greedy tokens [B][n_tokens] generated the way the official code generates (use_cache=False):
    every step runs the whole sequence again, with `blocks_for(sets)` ({layer: bool [B, T, T]})
    rebuilt for the grown sequence's token sets (generated tokens count as instruction tokens).
    `first_logits` [B, V] are step 0's (the prompt's last position under the same blocks). Visual
    token ids are never generated (they would be read as new image positions)."""
    import torch

    from himap.prune.adapters import visual_token_ids
    from himap.prune.tokens import token_sets

    visual = visual_token_ids(model)
    never = torch.tensor(list(visual), device=first_logits.device)  # visual ids are never generated
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    logits, new = first_logits, []
    for step in range(n_tokens):
        if step:
            sets = token_sets(ids, visual, mask)
            logits = disrupted_logits(model, {**rest, "input_ids": ids, "attention_mask": mask}, blocks_for(sets))
        nxt = logits.float().index_fill(-1, never, float("-inf")).argmax(-1, keepdim=True)  # [B, 1]
        new.append(nxt)
        ids = torch.cat([ids, nxt.to(ids.dtype)], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt, dtype=mask.dtype)], dim=1)
    return torch.cat(new, dim=1).tolist() if new else [[] for _ in range(ids.shape[0])]


def label_in_output(label: str, token_ids: list[int], decode, eos_ids=()) -> tuple[str, bool]:
    """(output text, whether `label` appears in it): the official consistency test. The ids are
    cut at the first end-of-sequence token (generation stops there), decoded without special
    tokens and stripped; the test is the official `label in outputs` (case-sensitive substring)."""
    ids = list(token_ids)
    cut = next((j for j, t in enumerate(ids) if t in set(eos_ids)), len(ids))
    text = decode(ids[:cut]).strip()
    return text, str(label) in text


def jaccard(a, b) -> float:
    """Jaccard similarity of two id collections."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def condition_key(flow: str, window: Window | str) -> str:
    return f"{flow}@{window if isinstance(window, str) else window.name}"


def disrupt_batch(model, inputs: dict, targets, accepted=None, config: DisruptConfig | None = None,
                  seeds=None, labels=None, decode=None) -> list[dict]:
    """Run every (flow, window) condition on a batch and score it against the undisturbed run.

    targets: [B] token ids of the answers' first tokens; accepted: per sample, the set of ids
    that count as correct (default {target}); seeds: per-sample img2rnd seeds (default
    config.seed + b). Returns one record per sample:
    {"target", "accepted", "base": {"pred", "top", "correct"},
     "runs": {"flow@window": {"layers", "pred", "top", "correct", "label_consistent",
                               "score_consistency"}}}.
    With config.official_tokens > 0, `labels` (the ground-truth answer texts) and `decode`
    (token ids -> text) are needed; the base and every run also get "output" (the text generated
    under the block) and "label_in_output" (the official label consistency).
    """
    import torch

    from himap.analysis.probe import decoder_layers
    from himap.models.loading import eos_ids
    from himap.prune.tokens import token_sets

    config = config or DisruptConfig()
    num_layers = len(decoder_layers(model))
    windows = parse_windows(config.windows, num_layers, config.from_layer_on)
    mask = inputs.get("attention_mask")
    ids = inputs["input_ids"]
    mask = torch.ones_like(ids) if mask is None else mask
    inputs = {**inputs, "attention_mask": mask}
    from himap.prune.adapters import visual_token_ids

    sets = token_sets(ids, visual_token_ids(model), mask)
    n = ids.shape[0]
    if not bool(sets.has_image.all()):
        raise ValueError("every sample needs image tokens for disruption (a sample has none)")
    targets = [int(t) for t in targets]
    accepted = [set(a) for a in accepted] if accepted is not None else [{t} for t in targets]
    seeds = [config.seed + b for b in range(n)] if seeds is None else list(seeds)

    if config.official_tokens < 0:
        raise ValueError(f"official_tokens must be >= 0, got {config.official_tokens}")
    if config.official_tokens and (labels is None or decode is None or len(labels) != n):
        raise ValueError("the official label consistency needs each sample's label text and a decode function")
    eos = eos_ids(model)

    def scored(logits, blocks_for):
        top = logits.float().topk(config.top_k, dim=-1).indices.tolist()
        out = [{"pred": t[0], "top": t, "correct": t[0] in accepted[b]} for b, t in enumerate(top)]
        if config.official_tokens:
            new = blocked_greedy(model, inputs, logits, blocks_for, config.official_tokens)
            for b, r in enumerate(out):
                r["output"], r["label_in_output"] = label_in_output(labels[b], new[b], decode, eos)
        return out

    base = scored(disrupted_logits(model, inputs, {}), lambda sets_: {})
    records = [{"target": targets[b], "accepted": sorted(accepted[b]), "base": base[b], "runs": {}}
               for b in range(n)]
    for flow in config.flows:
        block = flow_block(sets, flow, seeds)  # [B, T, T]
        for w in windows:
            blocks_for = lambda grown, flow=flow, w=w: {l: flow_block(grown, flow, seeds) for l in w.layers}  # noqa: E731
            runs = scored(disrupted_logits(model, inputs, {l: block for l in w.layers}), blocks_for)
            for b, r in enumerate(runs):
                r.update(layers=list(w.layers), label_consistent=r["pred"] == base[b]["pred"],
                         score_consistency=jaccard(r["top"], base[b]["top"]))
                records[b]["runs"][condition_key(flow, w)] = r
    return records


def log_ratio(e_vv: float, e_vt: float) -> float | None:
    """D = log(E_vv / E_vt) (eq. 7); None when either count is not positive (undefined)."""
    return math.log(e_vv / e_vt) if e_vv > 0 and e_vt > 0 else None


def summarize(records: list[dict]) -> dict:
    """Per-condition consistency and E over samples; D per window (eq. 7).

    {"n", "correct_before" (S), "conditions": {"flow@window": {"flow", "window", "layers", "n",
    "label_consistency", "score_consistency", "correct_after" (S_hat), "E", "accuracy_before",
    "accuracy_after"}}, "D": {window: {"E_vv", "E_vt", "D"}}}; when the records hold the official
    generation, also "label_in_output_before" and per condition "label_consistency_official"
    (the fraction of samples whose label appears in the output generated under the block).
    """
    n = len(records)
    s = sum(r["base"]["correct"] for r in records)
    conditions: dict[str, dict] = {}
    keys = list(records[0]["runs"]) if records else []
    for key in keys:
        runs = [r["runs"][key] for r in records if key in r["runs"]]
        if len(runs) != n:
            raise ValueError(f"condition {key} is missing from {n - len(runs)} sample record(s)")
        flow, window = key.split("@", 1)
        s_hat = sum(r["correct"] for r in runs)
        conditions[key] = {
            "flow": flow, "window": window, "layers": runs[0]["layers"], "n": n,
            "label_consistency": sum(r["label_consistent"] for r in runs) / n,
            "score_consistency": sum(r["score_consistency"] for r in runs) / n,
            "correct_after": s_hat, "E": s - s_hat,
            "accuracy_before": s / n, "accuracy_after": s_hat / n,
        }
        if all("label_in_output" in r for r in runs):
            conditions[key]["label_consistency_official"] = sum(r["label_in_output"] for r in runs) / n
    d = {}
    for key, c in conditions.items():
        if c["flow"] == "img2img" and condition_key("img2ins", c["window"]) in conditions:
            e_vt = conditions[condition_key("img2ins", c["window"])]["E"]
            d[c["window"]] = {"layers": c["layers"], "E_vv": c["E"], "E_vt": e_vt, "D": log_ratio(c["E"], e_vt)}
    out = {"n": n, "correct_before": s, "conditions": conditions, "D": d}
    if records and all("label_in_output" in r["base"] for r in records):
        out["label_in_output_before"] = sum(r["base"]["label_in_output"] for r in records) / n
    return out
