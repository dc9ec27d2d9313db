"""Information-flow analysis of multimodal LLMs (paper sections 2-3, appendices B-D).

- saliency: per-layer saliency of the token sets (eqs. 1-6), reduced to block sums as the
  backward pass reaches each layer.
- disrupt: block image-to-instruction, image-to-image or image-to-random flows at chosen layers
  and measure label/score consistency, E_l and D_l (eq. 7, appendix D).
- filter: keep samples answered correctly with the image and wrongly without it (appendix B).
- probe: the registered attention function both rely on; data: inputs; plots: figures 2-5.

Modules import torch lazily; `import himap.analysis` stays cheap.
"""
