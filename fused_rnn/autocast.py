"""Autocast for the fused_rnn layer ops on CUDA, as torch.nn's recurrent layers have it.

Inside ``torch.autocast("cuda")`` the forward ops cast their floating-point CUDA inputs
(float64 excepted) to float16 and run there. Float16 whatever the region's dtype: that is what
torch.nn's cuDNN RNNs do (ATen's autocast wrapper of _cudnn_rnn casts to half). The backward
ops need no rule: they run on the dtypes the forward saved. The rule casts above autograd, so that
autograd saves the cast tensors; an eager differentiable call, which otherwise runs the op below
autograd (ops._EagerLayer), goes through the dispatcher wherever a rule applies (ops._call_layer).
"""
import torch

for _name in ("lstm_layer", "gru_layer", "rnn_layer"):
    torch.library.register_autocast(f"fused_rnn::{_name}", "cuda", torch.float16)
