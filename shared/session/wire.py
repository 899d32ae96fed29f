"""Specs, layouts and segments in their NATS form (msgspec Structs of shared/protocol.py)."""

from __future__ import annotations

from shared.kv_spec import KvSpec, dtype_from_name, dtype_name
from shared.layouts import DecoderLayout, Layout, LayoutError, PrefillLayout
from shared.protocol import KvSegment, WireKvSpec, WireLayout
from shared.transfer_plan import TransferPlan
from shared.transport.ucx_kv import segment_tag


def spec_to_wire(spec: KvSpec) -> WireKvSpec:
    return WireKvSpec(
        spec.model_fingerprint, spec.num_layers, spec.num_q_heads, spec.num_kv_heads, spec.head_dim,
        dtype_name(spec.dtype), spec.page_size, spec.memory_layout, spec.num_experts,
    )


def spec_from_wire(wire: WireKvSpec) -> KvSpec:
    return KvSpec(
        wire.model_fingerprint, wire.num_layers, wire.num_q_heads, wire.num_kv_heads, wire.head_dim,
        dtype_from_name(wire.dtype), wire.page_size, wire.memory_layout, wire.num_experts,
    )


def layout_to_wire(layout: Layout) -> WireLayout:
    return WireLayout(layout.kind, layout.dp, layout.tp, layout.pp, layout.ep)


def layout_from_wire(wire: WireLayout) -> Layout:
    if wire.kind == "prefill":
        if wire.dp != 1:
            raise LayoutError(f"a prefill layout has dp=1, got dp={wire.dp}")
        return PrefillLayout(tp=wire.tp, pp=wire.pp, ep=wire.ep)
    if wire.kind == "decode":
        return DecoderLayout(dp=wire.dp, ep=wire.ep, tp=wire.tp, pp=wire.pp)
    raise LayoutError(f"unknown layout kind {wire.kind!r}")


def wire_segments(plan: TransferPlan, session_id: str, num_tokens: int) -> list[KvSegment]:
    """One transport message per pair buffer, tagged per session and rank pair."""
    return [
        KvSegment(p.src_rank, p.dst_rank, segment_tag(session_id, p.src_rank, p.dst_rank), plan.pair_nbytes(p, num_tokens))
        for p in plan.pairs
    ]
