"""Errors of a KV hand-off (a refusal before any byte moves is `shared.kv_spec.IncompatibleKvError`)."""


class KvTransferError(RuntimeError):
    """An accepted session whose bytes did not all arrive intact (timeout, wrong size, peer gone, lease over)."""
