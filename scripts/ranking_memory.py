"""Peak extra memory of the ranking rows (phi_dp over every visual row) on a long prompt, chunked
(himap.prune.rows.reduced_attention) versus dense rows (attention_rows), measured on CPU as the
growth of the process's resident-set high-water mark (ru_maxrss) over the inputs, each variant in
a fresh process (large tensors are mmapped and returned to the system when freed, so the
high-water mark is the allocator's real peak).

    python scripts/ranking_memory.py --visual 4096 --text 104 --heads 28 --kv-heads 4 --head-dim 128 --dense

Prints one JSON line: tokens, chunk rows, measured peaks and the stated bound.
"""

import argparse
import json
import resource
import subprocess
import sys


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(args, mode: str) -> dict:
    """Run one variant in this process: {"peak_bytes": growth of ru_maxrss, "scores": ...}."""
    import torch

    from himap.prune import criteria
    from himap.prune.rows import attention_rows, reduced_attention
    from himap.prune.tokens import token_sets

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    t = args.visual + args.text
    ids = torch.randint(10, 100, (1, t), generator=g)
    ids[0, 40:40 + args.visual] = 3  # the visual tokens
    sets = token_sets(ids, 3)
    q = torch.randn(1, args.heads, t, args.head_dim, generator=g)
    k = torch.randn(1, args.kv_heads, t, args.head_dim, generator=g)
    rows = criteria.needed_rows("phi_dp", sets)
    budget = int(args.budget_mib * 2 ** 20)
    reduced_attention(q[:, :, :8], k[:, :, :8], rows[:, :8], sets.valid[:, :8], 0.1, "column")  # warm kernels
    before = _rss()
    if mode == "chunked":
        scores = criteria.from_reduction(reduced_attention(q, k, rows, sets.valid, 0.1, "column", budget_bytes=budget), sets)
    else:
        scores = criteria.phi_dp(attention_rows(q, k, rows, sets.valid, 0.1), sets)
    return {"peak_bytes": _rss() - before, "checksum": float(scores[sets.image].double().sum())}


def main() -> None:
    from himap.prune.rows import ROW_CHUNK_BYTES, chunk_rows

    p = argparse.ArgumentParser()
    p.add_argument("--visual", type=int, default=4096)
    p.add_argument("--text", type=int, default=104)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--budget-mib", type=float, default=ROW_CHUNK_BYTES / 2 ** 20)
    p.add_argument("--dense", action="store_true", help="also measure the dense rows (needs ~2 x Hq x T^2 x 4 bytes)")
    p.add_argument("--mode", choices=("chunked", "dense"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(measure(args, args.mode)))
        return
    t = args.visual + args.text
    budget = int(args.budget_mib * 2 ** 20)
    c = chunk_rows(1, args.heads, t, budget)
    # one chunk: two fp32 [Hq, c, T] buffers (mask-and-logits accumulator, then probabilities), the
    # chunk's queries [Hq, c, D], its mask [c, T] as bool and as an fp32 bias; once: the keys' fp32
    # transposed copy [Hkv, D, T], the row weights and the result [T]
    bound = (2 * 4 * args.heads * c * t + 4 * args.heads * c * args.head_dim + 5 * c * t
             + 4 * args.kv_heads * args.head_dim * t + 2 * 4 * t)
    out = {"tokens": t, "visual": args.visual, "heads": args.heads, "kv_heads": args.kv_heads,
           "head_dim": args.head_dim, "budget_bytes": budget, "chunk_rows": c, "stated_bound_bytes": bound}
    for mode in ("chunked", "dense") if args.dense else ("chunked",):
        argv = [sys.executable, __file__, "--mode", mode] + [a for a in sys.argv[1:] if a != "--dense"]
        res = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        out[f"{mode}_peak_bytes"], out[f"{mode}_checksum"] = res["peak_bytes"], res["checksum"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
