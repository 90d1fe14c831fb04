"""What the tensors created while a block runs hold: the largest one, and the peak of their live bytes.

Counts what aten ops return (activations, logits, gradients), on any device; tensors that existed before
the block (parameters) are not counted. A storage counts once however many views share it, until freed.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0
        """Elements of the largest tensor any op created."""
        self.live = self.peak = 0
        """Bytes of the created storages still alive, now and at most."""
        self._alive: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            self.largest = max(self.largest, tensor.numel())
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in self._alive and key not in inputs:  # not a view, in-place or out= result
                self._alive.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, key, nbytes)  # a storage's Python object lives as long as it does
        return out
