"""Loading: lazy model views, device placement, tensor-parallel slices."""

from shardstore.load.loader import LoadOptions, LoadResult
from shardstore.load.view import ModelView, TensorSlice

__all__ = ["LoadOptions", "LoadResult", "ModelView", "TensorSlice"]
