"""CPU matmuls on weights pre-packed for oneDNN: the engine's view of a model, same weights, faster linears.

A decode step is a chain of matrix-vector products, bound by how fast weights stream
from memory. `F.linear` on a row-major `[out, in]` float32 weight reads it at about half
the bandwidth oneDNN reaches on the same weight reordered once into its blocked layout
(measured on the 2-core AVX-512 dev box: 11 vs 25 GB/s for the LM head), and prefill
matmuls gain too. So the engine runs a copy of the model whose `nn.Linear` layers (and
tied LM head) hold packed weights.

The copy shares everything else with the original: the module tree is copied only down
to the modules that own parameters other than through `nn.Linear` (norms, embedding,
MoE blocks), which are the original objects, so a later `set_ep` on the loaded model
reaches the engine too. Packing applies to float32 CPU models when PyTorch has oneDNN;
otherwise the original model is used as is. Packed results match `F.linear` to float32
rounding, not bit for bit. Memory: the packed weights are a second copy of the linears'.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """y = x W^T + b with W reordered once into oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        with torch.no_grad():
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


_packed_models: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def prepacked(model: nn.Module) -> nn.Module:
    """`model` itself when packing does not apply, else its packed twin (built once per model)."""
    if not _applies(model):
        return model
    twin = _packed_models.get(model)
    if twin is None:
        try:
            twin = _pack(model)
        except RuntimeError:  # a oneDNN build that refuses a shape or dtype: plain F.linear then
            twin = model
        _packed_models[model] = twin
    return twin


def _applies(model: nn.Module) -> bool:
    params = list(model.parameters())
    return packing_available() and bool(params) and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)


def _pack(model: nn.Module) -> nn.Module:
    # deepcopy's memo maps an object to its copy: mapping tensors and parameter-owning
    # modules to themselves shares them, so only containers and nn.Linear are copied.
    memo: dict[int, object] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for module in model.modules():
        if not isinstance(module, nn.Linear) and any(True for _ in module.parameters(recurse=False)):
            memo[id(module)] = module
    twin = copy.deepcopy(model, memo)
    with torch.no_grad():
        for parent in list(twin.modules()):
            if parent is not twin and memo.get(id(parent)) is parent:
                continue  # shared with the original: left untouched
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PackedLinear(child.weight, child.bias))
        embedding = getattr(twin, "embed_tokens", None)
        if getattr(twin, "lm_head", "absent") is None and isinstance(embedding, nn.Embedding):
            twin.lm_head = PackedLinear(embedding.weight)  # the tied head, packed like the rest
    return twin.eval()
