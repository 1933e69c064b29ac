"""Loading: lazy model views, device placement, tensor-parallel slices."""

from shardstore.load.view import ModelView, TensorSlice

__all__ = ["ModelView", "TensorSlice"]
