"""The staging pool hands out warm buffers of several sizes without confusing them."""

from shared.transport.staging_pool import StagingPool


def test_buffers_of_several_sizes_come_back_and_go_out_again():
    pool = StagingPool()
    small, large = pool.take(1 << 20), pool.take(2 << 20)
    pool.give_back(small)
    pool.give_back(large)
    assert pool.idle_bytes == 3 << 20
    again = pool.take(2 << 20)  # the larger idle buffer, picked among several (once: an elementwise compare crashed)
    assert again.numel() == 2 << 20 and again.data_ptr() == large.data_ptr()
    assert pool.idle_bytes == 1 << 20
    other = pool.take(1 << 20)
    assert other.data_ptr() == small.data_ptr() and pool.idle_bytes == 0
