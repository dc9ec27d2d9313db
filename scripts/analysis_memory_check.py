import json
import resource
import sys
import time

import torch

torch.set_num_threads(1)
from himap.analysis.saliency import SaliencyConfig, saliency
from himap.models.testing import tiny_inputs, tiny_llava

mode = sys.argv[1]
L = int(sys.argv[2]) if len(sys.argv) > 2 else 16
m = tiny_llava(seed=0, attn_implementation="eager" if mode == "reference" else "sdpa", num_layers=L, hidden=512, heads=8, kv_heads=8, image_size=96, patch=4, vocab=1000)
inp = tiny_inputs(m.config, n_system=(35,), n_instruction=(40,))
T = inp["input_ids"].shape[1]
tg = torch.tensor([7])
with torch.no_grad():
    m(**inp, use_cache=False, logits_to_keep=1)  # warm up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
if mode == "ours":
    r = saliency(m, inp, tg, SaliencyConfig())
elif mode == "forward":
    with torch.no_grad(): m(**inp, use_cache=False, logits_to_keep=1)
else:
    out = m(**inp, use_cache=False, output_attentions=True, logits_to_keep=1)
    loss = torch.nn.functional.cross_entropy(out.logits[:, -1], tg)
    grads = torch.autograd.grad(loss, out.attentions)
    sal = [(a * g).abs().mean(1) for a, g in zip(out.attentions, grads)]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mode": mode, "layers": L, "tokens": T, "heads": 8, "peak_rss_increase_MiB": round((peak - base) / 1024, 1), "seconds": round(time.time() - t, 2)}))
