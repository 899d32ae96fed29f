import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.kv_cache import BlockAllocator, PagedKVCache, blocks_needed, slot_mapping
from shared.engine.presets import TINY_LLAMA_CONFIG


def test_allocator_query_command_pairs():
    alloc = BlockAllocator(4)
    assert alloc.can_allocate(4) and not alloc.can_allocate(5)
    first = alloc.allocate(3)
    assert len(set(first)) == 3 and alloc.num_free == 1
    assert not alloc.can_allocate(2)
    with pytest.raises(RuntimeError):
        alloc.allocate(2)
    assert alloc.num_free == 1  # a refused allocation takes nothing
    alloc.free(first)
    assert alloc.num_free == 4


def test_allocator_refuses_double_free():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    alloc.free(blocks)
    with pytest.raises(ValueError):
        alloc.free(blocks)
    with pytest.raises(ValueError):
        alloc.free([0, 0])
    assert alloc.num_free == 4


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=40))
def test_allocator_never_hands_out_a_block_twice(ops):
    alloc = BlockAllocator(8)
    held: list[list[int]] = []
    for allocate, n in ops:
        if allocate and alloc.can_allocate(n):
            held.append(alloc.allocate(n))
        elif held:
            alloc.free(held.pop(n % len(held)))
        in_use = [b for blocks in held for b in blocks]
        assert len(in_use) == len(set(in_use))
        assert alloc.num_free + len(in_use) == 8
    for blocks in held:
        alloc.free(blocks)
    assert alloc.num_free == 8


def test_blocks_needed_rounds_up():
    assert [blocks_needed(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_slot_mapping_follows_the_block_table():
    table = torch.tensor([5, 2, 9])
    slots = slot_mapping(table, torch.tensor([0, 3, 4, 7, 8, 11]), block_size=4)
    assert slots.tolist() == [20, 23, 8, 11, 36, 39]


def test_cache_layout_write_read_export_load():
    cfg = TINY_LLAMA_CONFIG
    cache = PagedKVCache(cfg, num_blocks=6, block_size=4)
    assert cache.key.shape == (cfg.num_layers, cfg.num_kv_heads, 6, 4, cfg.head_dim)
    slots = torch.tensor([21, 22, 3])
    key = torch.randn(3, cfg.num_kv_heads, cfg.head_dim)
    value = torch.randn(3, cfg.num_kv_heads, cfg.head_dim)
    cache.write(1, slots, key, value)
    assert torch.equal(cache.key[1, :, 5, 1], key[0])  # slot 21 = page 5, offset 1 (head-major pages)
    assert torch.equal(cache.value[1, :, 0, 3], value[2])
    read_key, read_value = cache.read(1, slots)
    assert torch.equal(read_key, key) and torch.equal(read_value, value)
    exported = cache.export(slots)
    assert exported.shape == (cfg.num_layers, 2, 3, cfg.num_kv_heads, cfg.head_dim) and exported.is_contiguous()
    other = PagedKVCache(cfg, num_blocks=2, block_size=8, dtype=torch.bfloat16)
    other.load(torch.tensor([0, 9, 15]), exported)
    assert torch.equal(other.export(torch.tensor([0, 9, 15])), exported.to(torch.bfloat16))


def test_allocator_prefers_contiguous_runs():
    alloc = BlockAllocator(10)
    a, b, c = alloc.allocate(3), alloc.allocate(2), alloc.allocate(3)
    assert (a, b, c) == ([0, 1, 2], [3, 4], [5, 6, 7])
    alloc.free(a)
    alloc.free(c)
    assert alloc.allocate(4) == [5, 6, 7, 8]  # first run long enough, not the first free pages
    assert alloc.allocate(4) == [0, 1, 2, 9]  # no run left: the lowest free pages
    assert alloc.num_free == 0


def test_read_pages_and_read_run():
    cfg = TINY_LLAMA_CONFIG
    cache = PagedKVCache(cfg, num_blocks=6, block_size=4)
    cache.key.copy_(torch.randn(cache.key.shape))
    cache.value.copy_(torch.randn(cache.value.shape))
    key, value = cache.read_pages(1, torch.tensor([[5, 2], [0, 0]]))
    assert key.shape == (cfg.num_kv_heads, 2, 8, cfg.head_dim)
    assert torch.equal(key[:, 0, :4], cache.key[1, :, 5]) and torch.equal(key[:, 0, 4:], cache.key[1, :, 2])
    assert torch.equal(value[:, 1, 4:], cache.value[1, :, 0])
    run_key, run_value = cache.read_run(1, first_slot=9, length=6)  # slots 9 .. 14: pages 2 and 3
    assert run_key.shape == (cfg.num_kv_heads, 6, cfg.head_dim)
    assert torch.equal(run_key.transpose(0, 1), cache.read(1, torch.arange(9, 15))[0])
    assert torch.equal(run_value.transpose(0, 1), cache.read(1, torch.arange(9, 15))[1])
    assert run_key.data_ptr() == cache.key[1, 0, 2, 1].data_ptr()  # a view, not a copy
