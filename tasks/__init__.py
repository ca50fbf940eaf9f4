"""Prefect tasks of realfake: thin wrappers over the library with retries, content caching, GPU slots and
artifacts. The library itself (:mod:`realfake`) never imports Prefect; everything Prefect-specific is here.
"""

__all__ = ["artifacts", "cache", "gpu", "group_worker", "stages", "versions"]
