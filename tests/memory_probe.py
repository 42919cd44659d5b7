"""The largest tensor an op creates, counted on meta tensors (memory-bound tests)."""
import torch


def largest_intermediate(run) -> int:
    """numel of the largest tensor any op creates while ``run()`` executes."""
    largest = 0

    class Largest(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    largest = max(largest, t.numel())
            return out

    with Largest():
        run()
    return largest
