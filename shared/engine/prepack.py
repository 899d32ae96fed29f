"""The engine's view of a model: same weights, faster CPU linears.

A decode step is a chain of matrix-vector products, bound by how fast weights stream
from memory. Two ways to move fewer or faster bytes, each a twin of the model whose
`nn.Linear` layers (and tied LM head) are replaced:
- dense twin: weights pre-packed for oneDNN. `F.linear` on a row-major `[out, in]`
  float32 weight reads it at about half the bandwidth oneDNN reaches on the same weight
  reordered once into its blocked layout (measured on the 2-core dev box: 11 vs 25 GB/s
  for the LM head), and prefill matmuls gain too. Results match `F.linear` to float32
  rounding, not bit for bit. Applies to float32 CPU models when PyTorch has oneDNN.
- block twin (GGUF models): each linear's weights in their GGUF blocks (Q4_1/Q8_0,
  block_weights.py) for batches of up to BLOCK_PATH_MAX_ROWS rows, where streaming 5x
  fewer bytes wins; the kernel expands blocks to the very same float32 values and
  computes in float32 (block_matmul.c). Larger batches (prefill) take a packed dense
  copy of the same weights. q/k/v and gate/up run as one fused matmul each, on either
  path (fewer calls per token: 3-4% faster decode). Applies when the kernel builds on
  this machine (AVX2 and a C compiler) and the model is float32.

Each twin shares everything else with the original: the module tree is copied only down
to the modules that own parameters other than through `nn.Linear` (norms, embedding,
MoE blocks), which are the original objects, so a later `set_ep` on the loaded model
reaches the engine too. Memory: the packed weights are a second copy of the linears',
the blocks a further ~1/5 of that.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from shared.engine.block_matmul import BlockKernel, default_kernel
from shared.engine.block_weights import BlockWeight, stack_rows
from shared.engine.model import MLP, Attention

# Rows (tokens) up to which the block kernel beats the packed dense matmul on smollm2-135m
# (2-core AVX2 box); above it the dense weights' higher arithmetic rate wins.
BLOCK_PATH_MAX_ROWS = 8


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


class BlockLinear(nn.Module):
    """y = x W^T + b: W's GGUF blocks for up to `max_rows` rows of x, else `dense` (the same W and b in float32)."""

    def __init__(
        self,
        weight: BlockWeight,
        bias: torch.Tensor | None,
        dense: nn.Module,
        kernel: BlockKernel,
        max_rows: int = BLOCK_PATH_MAX_ROWS,
    ):
        super().__init__()
        self.weight_blocks = weight
        self.bias = None if bias is None else bias.detach()
        self.dense = dense
        self.max_rows = max_rows
        self._block_matmul = kernel.bind(weight)
        self._in_features, self._out_features = weight.in_features, weight.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        flat = x if x.dim() == 2 else x.reshape(-1, self._in_features)  # [M, in]
        if flat.shape[0] > self.max_rows or x.dtype != torch.float32:
            return self.dense(x)
        y = self._block_matmul(flat)
        if self.bias is not None:
            y += self.bias
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self._out_features)


class ConcatLinear(nn.Module):
    """The outputs of several linears on one input, concatenated: the dense path of a fused BlockLinear."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


# model -> {uses blocks: twin}
_twins: weakref.WeakKeyDictionary[nn.Module, dict[bool, nn.Module]] = weakref.WeakKeyDictionary()


def prepacked(model: nn.Module, block_weights: Mapping[str, BlockWeight] | None = None) -> nn.Module:
    """The model's fastest twin (built once per model and kind); `model` itself when nothing applies.

    `block_weights`: GGUF blocks of the linears' weights by parameter name (`LoadedModel.block_weights`);
    none or empty gives the dense twin.
    """
    kernel = default_kernel() if block_weights and _is_float32_cpu(model) else None
    twins = _twins.setdefault(model, {})
    uses_blocks = kernel is not None
    if uses_blocks not in twins:
        twins[uses_blocks] = _block_twin(model, block_weights or {}, kernel) if kernel is not None else _dense_twin(model)
    return twins[uses_blocks]


def uses_block_weights(model: nn.Module) -> bool:
    """Whether `model` (an engine's twin) computes any linear on GGUF blocks."""
    return any(isinstance(module, BlockLinear) for module in model.modules())


def _dense_twin(model: nn.Module) -> nn.Module:
    if not (packing_available() and _is_float32_cpu(model)):
        return model
    try:
        return _pack(model)
    except RuntimeError:  # a oneDNN build that refuses a shape or dtype: plain F.linear then
        return model


def _is_float32_cpu(model: nn.Module) -> bool:
    params = list(model.parameters())
    return bool(params) and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)


def _shallow_twin(model: nn.Module, keep: type[nn.Module]) -> nn.Module:
    """A copy of `model` whose containers and `keep` modules are new; tensors and other parameter owners are shared."""
    # deepcopy's memo maps an object to its copy: mapping tensors and parameter-owning
    # modules to themselves shares them, so only containers and `keep` modules are copied.
    memo: dict[int, object] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for module in model.modules():
        if not isinstance(module, keep) and any(True for _ in module.parameters(recurse=False)):
            memo[id(module)] = module
    return copy.deepcopy(model, memo)


def _pack(model: nn.Module) -> nn.Module:
    twin = _shallow_twin(model, nn.Linear)
    originals = set(map(id, model.modules()))
    with torch.no_grad():
        for parent in list(twin.modules()):
            if parent is not twin and id(parent) in originals:
                continue  # shared with the original: left untouched
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PackedLinear(child.weight, child.bias))
        if _computes_tied_head(twin):
            twin.lm_head = PackedLinear(twin.embed_tokens.weight)  # the tied head, packed like the rest
    return twin.eval()


# Projections of one input that the block twin runs as one matmul: fewer calls per token.
_FUSED = {Attention: ("qkv_proj", ("q_proj", "k_proj", "v_proj")), MLP: ("gate_up_proj", ("gate_proj", "up_proj"))}


def _block_twin(model: nn.Module, block_weights: Mapping[str, BlockWeight], kernel: BlockKernel) -> nn.Module:
    """A twin whose linears with blocks are BlockLinears over a dense fallback of the same weights (`_dense_linear`)."""
    twin = _shallow_twin(model, nn.Linear)
    originals = set(map(id, model.modules()))

    def block_linear(paths: list[str]) -> BlockLinear | None:
        """One BlockLinear computing the linears at `paths` (outputs side by side), if all have blocks alike."""
        weights = [w for w in (block_weights.get(f"{path}.weight") for path in paths) if w is not None]
        linears = [twin.get_submodule(path) for path in paths]
        biases = [b for b in map(_bias, linears) if b is not None]
        if len(weights) < len(paths) or len({w.format for w in weights}) > 1 or len(biases) not in (0, len(paths)):
            return None
        blocks = weights[0] if len(weights) == 1 else stack_rows(weights)
        bias = None if not biases else biases[0] if len(biases) == 1 else torch.cat(biases)
        return BlockLinear(blocks, bias, _dense_linear(linears, bias), kernel)

    with torch.no_grad():
        for path, parent in list(twin.named_modules()):
            if parent is not twin and id(parent) in originals:
                continue  # shared with the original: left untouched
            prefix = f"{path}." if path else ""
            fused_name, fused_parts = _FUSED.get(type(parent), ("", ()))
            fused = block_linear([prefix + name for name in fused_parts]) if fused_parts else None
            if fused is not None:
                setattr(parent, fused_name, fused)
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and not (fused is not None and name in fused_parts):
                    # No usable blocks (another format, or dropped as inexact): the packed dense path.
                    setattr(parent, name, block_linear([prefix + name]) or _dense_linear([child], _bias(child)))
        tied = block_weights.get("embed_tokens.weight")
        if _computes_tied_head(twin):
            dense_head = _dense_linear([_linear_over(twin.embed_tokens.weight)], None)
            twin.lm_head = dense_head if tied is None else BlockLinear(tied, None, dense_head, kernel)
    return twin.eval()


def _computes_tied_head(model: nn.Module) -> bool:
    """Whether the model's head is its embedding matrix and this rank computes logits (its last pipeline stage)."""
    has_head_slot = getattr(model, "lm_head", "absent") is None
    return has_head_slot and isinstance(getattr(model, "embed_tokens", None), nn.Embedding) and getattr(model, "norm", None) is not None


def _dense_linear(linears: list[nn.Module], bias: torch.Tensor | None) -> nn.Module:
    """The linears' weights stacked as one dense float32 matmul (packed for oneDNN where it can be) for large batches.

    One GEMM for a fused projection: concatenating separate outputs cost ~5% of a 1K-token prefill.
    """
    if packing_available():
        weight = linears[0].weight if len(linears) == 1 else torch.cat([linear.weight for linear in linears])
        try:
            return PackedLinear(weight, bias)
        except RuntimeError:  # a oneDNN build that refuses a shape: plain matmuls then
            pass
    return linears[0] if len(linears) == 1 else ConcatLinear(linears)


def _bias(linear: nn.Module) -> torch.Tensor | None:
    bias = getattr(linear, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def _linear_over(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear whose weight is `weight` itself (the tied head when there is no packed one)."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = weight
    return linear
