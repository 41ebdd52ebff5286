"""``make_pool``: the pool a recipe asks for, whichever side of the client/server split it lives on."""

from __future__ import annotations


def make_pool(pool_cfg):
    """``pool.backend`` "serve": the shared Ray Serve application (started if it is not running,
    on the connected cluster); "local": tools and scorers in this process."""
    if pool_cfg.manifest:
        # the neural tools, as each Serve replica registers them: a local pool runs them here, and
        # with Serve the caller still reads their subtasks and schemas (weights load lazily: never here)
        from tool_pool.neural import manifest_path, register_manifest

        register_manifest(manifest_path(pool_cfg.manifest))
    if pool_cfg.backend == "local":
        from tool_pool.client import LocalPool

        return LocalPool(pool_cfg.tools, cache_bytes=pool_cfg.cache_bytes)
    if pool_cfg.backend == "serve":
        from tool_pool.serve_app import start_pool

        return start_pool(pool_cfg)
    raise ValueError(f"pool.backend must be 'serve' or 'local', got {pool_cfg.backend!r}")
