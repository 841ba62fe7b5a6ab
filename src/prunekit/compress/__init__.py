"""Storage: quantization that keeps zeros, compressed sparse formats, save / load without pickle."""

from prunekit.compress.sparse_format import size_report

__all__ = ["size_report"]
