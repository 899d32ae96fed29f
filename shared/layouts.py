"""How one worker instance shards a model: tp, pp, dp (attention) and ep (experts).

`world = dp * tp * pp`; `ep` must divide `world` (experts are spread over the same ranks).
Ranks are numbered with tp fastest, then pp, then dp:

    rank = (d * pp + p) * tp + t

The KV shard of rank `(d, p, t)` is the layers of stage `p` and the KV heads of tensor
slice `t`, for the requests of DP group `d`.

- Layers: stage `p` holds a contiguous run; every stage gets `num_layers // pp` layers
  and the first `num_layers % pp` stages one more (earlier stages take the remainder).
- Heads: with `tp <= num_kv_heads` (which must be divisible by tp) slice `t` holds
  `num_kv_heads // tp` consecutive heads; with `tp > num_kv_heads` (tp must be a
  multiple) each head is replicated on `tp // num_kv_heads` consecutive tp ranks.

Ranks are virtual for now (one process keeps every shard) but all of the above is what
the multi-GPU deployment holds, so the transfer plan does not change when ranks become real.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from shared.kv_spec import KvSpec


class LayoutError(ValueError):
    """An impossible layout; the message says what is wrong and lists the valid choices."""


class RankCoord(NamedTuple):
    dp: int
    pp: int
    tp: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _choices(values: list[int]) -> str:
    if len(values) > 6 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(str(v) for v in values)


def _check_positive(layout: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(layout, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise LayoutError(f"{type(layout).__name__}.{name} must be a positive integer, got {value!r}")


class _Sharding:
    """Rank arithmetic shared by both layout types (they provide dp, tp, pp, ep)."""

    dp: int
    tp: int
    pp: int
    ep: int

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    def rank(self, dp: int, pp: int, tp: int) -> int:
        if not (0 <= dp < self.dp and 0 <= pp < self.pp and 0 <= tp < self.tp):
            raise IndexError(f"rank ({dp}, {pp}, {tp}) outside {self}")
        return (dp * self.pp + pp) * self.tp + tp

    def coord(self, rank: int) -> RankCoord:
        if not 0 <= rank < self.world:
            raise IndexError(f"rank {rank} outside world of {self.world} for {self}")
        group, t = divmod(rank, self.tp)
        d, p = divmod(group, self.pp)
        return RankCoord(d, p, t)

    def ranks(self) -> list[RankCoord]:
        return [self.coord(r) for r in range(self.world)]

    def group_ranks(self, dp_group: int) -> list[int]:
        """The ranks of one DP group, in rank order."""
        return [self.rank(dp_group, p, t) for p in range(self.pp) for t in range(self.tp)]

    def layers_of(self, stage: int, num_layers: int) -> range:
        """Layers of pipeline stage `stage`; earlier stages take the remainder."""
        if not 0 <= stage < self.pp:
            raise IndexError(f"stage {stage} outside pp={self.pp}")
        base, extra = divmod(num_layers, self.pp)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (1 if stage < extra else 0))

    def kv_heads_of(self, tp_rank: int, num_kv_heads: int) -> range:
        """KV heads held by tensor slice `tp_rank` (one head, replicated, when tp > heads)."""
        if not 0 <= tp_rank < self.tp:
            raise IndexError(f"tp rank {tp_rank} outside tp={self.tp}")
        if self.tp <= num_kv_heads:
            per_rank = num_kv_heads // self.tp
            return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)
        head = tp_rank // (self.tp // num_kv_heads)
        return range(head, head + 1)

    def primary_tp_rank(self, head: int, num_kv_heads: int) -> int:
        """The lowest tp rank holding `head`: the one replica that sends it."""
        if self.tp <= num_kv_heads:
            return head // (num_kv_heads // self.tp)
        return head * (self.tp // num_kv_heads)

    def describe(self) -> str:
        """The `key=value,...` form that `parse_layout` reads."""
        return ",".join(f"{key}={getattr(self, key)}" for key in _KEYS[self.kind])

    kind: Literal["prefill", "decode"]


@dataclass(frozen=True)
class PrefillLayout(_Sharding):
    """A prefill worker: one DP group (prompts are independent, so dp is always 1)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1

    kind = "prefill"

    @property
    def dp(self) -> int:  # type: ignore[override]
        return 1

    def __post_init__(self) -> None:
        _check_positive(self, ("tp", "pp", "ep"))
        _check_ep_divides_world(self)


@dataclass(frozen=True)
class DecoderLayout(_Sharding):
    """A decode worker. `tp` defaults to `ep // dp` (at least 1), as in `DecoderLayout(dp=4, ep=16)`."""

    dp: int = 1
    ep: int = 1
    tp: int = None  # type: ignore[assignment]  # resolved in __post_init__
    pp: int = 1

    kind = "decode"

    def __post_init__(self) -> None:
        _check_positive(self, ("dp", "ep", "pp"))
        if self.tp is None:
            object.__setattr__(self, "tp", max(self.ep // self.dp, 1))
        _check_positive(self, ("tp",))
        _check_ep_divides_world(self)


Layout = PrefillLayout | DecoderLayout

_KEYS: dict[str, tuple[str, ...]] = {"prefill": ("tp", "pp", "ep"), "decode": ("dp", "tp", "pp", "ep")}


def _check_ep_divides_world(layout: _Sharding) -> None:
    if layout.world % layout.ep:
        raise LayoutError(
            f"{layout!r}: ep={layout.ep} must divide world = dp*tp*pp = {layout.world}; "
            f"valid ep for this world: {_choices(_divisors(layout.world))}"
        )


def valid_tp(spec: KvSpec) -> list[int]:
    """tp sizes that split the query heads and either split or replicate the KV heads."""
    heads = spec.num_kv_heads
    return [
        t for t in range(1, spec.num_q_heads + 1)
        if spec.num_q_heads % t == 0 and (heads % t == 0 if t <= heads else t % heads == 0)
    ]


def valid_pp(spec: KvSpec) -> list[int]:
    return list(range(1, spec.num_layers + 1))


def valid_ep(spec: KvSpec, world: int) -> list[int]:
    """ep sizes for a given world: 1 for dense models, else divisors of world and of the expert count."""
    if spec.num_experts == 0:
        return [1]
    return [e for e in _divisors(world) if spec.num_experts % e == 0]


def layout_problems(layout: Layout, spec: KvSpec) -> list[str]:
    problems = []
    if layout.tp not in valid_tp(spec):
        if spec.num_q_heads % layout.tp:
            problems.append(f"tp={layout.tp} does not divide the {spec.num_q_heads} query heads")
        else:
            problems.append(
                f"tp={layout.tp} neither divides nor is a multiple of the {spec.num_kv_heads} KV heads"
            )
    if layout.pp > spec.num_layers:
        problems.append(f"pp={layout.pp} exceeds the {spec.num_layers} layers")
    if layout.ep > 1 and spec.num_experts == 0:
        problems.append(f"ep={layout.ep} needs a mixture-of-experts model; this model is dense")
    elif spec.num_experts and spec.num_experts % layout.ep:
        problems.append(f"ep={layout.ep} does not divide the {spec.num_experts} experts")
    return problems


def validate(layout: Layout, spec: KvSpec) -> None:
    """Raises `LayoutError` naming every problem and listing the valid choices for the model."""
    problems = layout_problems(layout, spec)
    if not problems:
        return
    experts = f"{spec.num_experts} experts" if spec.num_experts else "dense"
    model = (
        f"model {spec.model_fingerprint} ({spec.num_q_heads} query heads, {spec.num_kv_heads} KV heads, "
        f"{spec.num_layers} layers, {experts})"
    )
    raise LayoutError(
        f"{layout!r} is invalid for {model}: {'; '.join(problems)}. "
        f"Valid tp: {_choices(valid_tp(spec))}; valid pp: {_choices(valid_pp(spec))}; "
        f"valid ep for world={layout.world}: {_choices(valid_ep(spec, layout.world))}"
    )


def parse_layout(text: str, kind: Literal["prefill", "decode"]) -> Layout:
    """`"tp=4,ep=4"` -> a layout of `kind`; an empty string gives the default layout."""
    if kind not in _KEYS:
        raise LayoutError(f"unknown layout kind {kind!r}: use 'prefill' or 'decode'")
    keys = _KEYS[kind]
    values: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep:
            raise LayoutError(f"{kind} layout {text!r}: {item!r} is not key=value (keys: {', '.join(keys)})")
        if key not in keys:
            raise LayoutError(f"{kind} layout {text!r}: unknown key {key!r}; valid keys: {', '.join(keys)}")
        if key in values:
            raise LayoutError(f"{kind} layout {text!r}: key {key!r} given twice")
        if not raw.isdigit() or int(raw) <= 0:
            raise LayoutError(f"{kind} layout {text!r}: {key}={raw!r} is not a positive integer")
        values[key] = int(raw)
    if kind == "prefill":
        return PrefillLayout(**values)
    return DecoderLayout(**values)
