"""The KV re-shard on the serving path: pair buffers gathered on the prefill side and
scattered into the decoder's paged cache (Triton kernels and the token-by-token oracle
live in `kernels/`)."""
