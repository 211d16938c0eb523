"""fastclip's operators, one per module; `fastclip.functional` exports them as functions.

- `attention`: the encoders' attention (Triton kernels in `attention_triton`, SDPA);
- `contrastive_lse`: the fused log-sum-exps of the CLIP loss (C++/CUDA op, tiled PyTorch);
- `contrastive_loss`, `supcon_loss`: the losses built on it, with their fused gradient (`contrastive_gradient`);
- `pairwise_sigmoid`, `sigmoid_loss`: SigLIP's sigmoid loss.
"""
