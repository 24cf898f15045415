"""A simulated CUDA device on a CPU-only machine, to check the library's device hygiene without a GPU.

`SimulatedCuda()` is a context in which ``cuda:0`` exists: tensors created on it or moved to it are `SimTensor`s
(a wrapper subclass that reports ``device='cuda:0'`` and holds a real CPU tensor), and every operation on them runs
on the CPU tensor inside. The context records what would go wrong or cost a round trip on a real GPU:

- ``mixed``: an operation mixing a device tensor with a host tensor of one element or more, which CUDA refuses
  (0-dim host scalars are allowed, as on CUDA; so are copies and CPU index tensors, which CUDA accepts);
- ``numpy``: ``.numpy()`` of a device tensor (CUDA raises);
- host syncs, by kind: ``item`` (``.item()``, ``bool()``, ``int()``, ``float()`` of a device tensor), ``tolist``,
  ``cpu`` (a copy to the host), ``synchronize`` (explicit ``torch.cuda.synchronize``).

Models are moved with ``module.to("cuda")`` as on a GPU. The simulation is only as good as torch's dispatch: code
that reads a device tensor's storage directly (``data_ptr``) fails here, loudly.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

# The simulated device is torch's "meta" device type: a non-CPU device that torch can guard (set as current) in a
# CPU-only build, which "cuda" cannot be. The library must treat it as any accelerator: nothing in it tests for meta.
SIM = torch.device("meta")
SYNC_KINDS = ("item", "tolist", "cpu", "synchronize")
# Operations CUDA accepts with host tensors among device ones: copies and (advanced) indexing with CPU indices.
_HOST_OK = {"copy_", "_to_copy", "index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index"}


def _is_cuda(device) -> bool:
    """Whether `device` names the simulated device."""
    if isinstance(device, str):
        device = torch.device(device)
    return isinstance(device, torch.device) and device.type == SIM.type


def _host_device(x):
    return torch.device("cpu") if _is_cuda(x) else x


class SimTensor(torch.Tensor):
    """A tensor on the simulated device: reports cuda:0, computes on `elem`, a CPU tensor."""

    elem: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=SIM, requires_grad=elem.requires_grad,
        )  # fmt: skip
        r.elem = elem
        return r

    def __repr__(self) -> str:
        return f"SimTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sim = _active[-1] if _active else None
        name = func.__name__.split(".")[0]
        flat = [a for a in _leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if sim is not None and name not in _HOST_OK and any(
            not isinstance(t, SimTensor) and t.dim() > 0 for t in flat
        ):
            sim.record("mixed", f"{func}: device and host tensors")
        to_host = name == "_to_copy" and kwargs.get("device") is not None and not _is_cuda(kwargs["device"])
        if sim is not None and name == "_local_scalar_dense":
            sim.record("item")
        if sim is not None and to_host:
            sim.record("cpu")
        unwrap = lambda x: x.elem if isinstance(x, SimTensor) else _host_device(x)  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if to_host:
            return out
        wrap = lambda x: SimTensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, SimTensor) else x  # noqa: E731
        return tree_map(wrap, out)


def active() -> "SimulatedCuda | None":
    """The innermost simulation in effect, if any."""
    return _active[-1] if _active else None


def _leaves(tree) -> list:
    from torch.utils._pytree import tree_leaves

    return tree_leaves(tree)


_active: list["SimulatedCuda"] = []
# Composite functions that build helper tensors on their input's device inside C++ (SDPA's causal mask): on a
# SimTensor those would be real meta tensors (without data), so they run on the unwrapped CPU tensors as one call;
# torch.where(cond, 0, x) wraps its Python scalar into such a tensor.
_RUN_UNWRAPPED = {torch.nn.functional.scaled_dot_product_attention, torch.where}


class SimulatedCuda(TorchFunctionMode):
    """The context (see the module docstring). ``counts`` holds the events by kind; ``where`` the first few call
    sites of the `mixed` and `numpy` violations and ``sites`` the count of host syncs per call site (file:line of
    library code)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.where: dict[str, list[str]] = {}
        self.sites: Counter[str] = Counter()  # "kind file:line" of every host sync
        self._paused = 0

    def record(self, kind: str, what: str = "") -> None:
        self.counts[kind] += 1
        site = self._site()
        if kind in SYNC_KINDS:
            self.sites[f"{kind} {site}"] += 1
        elif len(self.where.setdefault(kind, [])) < 5:
            self.where[kind].append(f"{site} {what}".strip())

    @staticmethod
    def _site() -> str:
        """file:line of the innermost library frame (not this module, not the benchmarks)."""
        for f in reversed(traceback.extract_stack()):
            if "dpslm_stream" in f.filename and "/bench/" not in f.filename:
                return f"{f.filename.split('dpslm_stream/')[-1]}:{f.lineno}"
        return "?"

    def syncs(self) -> int:
        return sum(self.counts[k] for k in SYNC_KINDS)

    def snapshot(self) -> Counter:
        return Counter(self.counts)

    def __enter__(self):
        _active.append(self)
        self._patch = contextlib.ExitStack()
        real_sync = torch.cuda.synchronize

        def synchronize(device=None):
            self.record("synchronize")

        torch.cuda.synchronize = synchronize
        self._patch.callback(setattr, torch.cuda, "synchronize", real_sync)
        # Wrapper subclasses cannot be viewed in inference mode (torch refuses their version counters): the library's
        # inference_mode blocks run as no_grad blocks here, which computes the same values.
        im = torch.autograd.grad_mode.inference_mode
        enter, exit_ = im.__enter__, im.__exit__

        def no_grad_enter(ctx):
            ctx._sim_no_grad = torch.no_grad()
            ctx._sim_no_grad.__enter__()

        def no_grad_exit(ctx, *exc):
            ctx._sim_no_grad.__exit__(*exc)

        im.__enter__, im.__exit__ = no_grad_enter, no_grad_exit
        # module.to("cuda") must replace each parameter by a new one around the SimTensor (not set .data on it).
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        self._patch.callback(torch.__future__.set_overwrite_module_params_on_conversion, overwrite)
        self._patch.callback(setattr, im, "__enter__", enter)
        self._patch.callback(setattr, im, "__exit__", exit_)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patch.close()
            _active.remove(self)

    @contextlib.contextmanager
    def paused(self):
        """Plain torch inside (e.g. loading checkpoints on the CPU: the loaders build skeletons on the real meta
        device, which this simulation would otherwise take for its own)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        self_t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        on_sim = isinstance(self_t, SimTensor)
        if on_sim and name in ("numpy", "__array__"):
            self.record("numpy", f".{name}() of a device tensor")
            return getattr(self_t.elem, name)(*args[1:], **kwargs)
        if on_sim and name == "tolist":
            self.record("tolist")
            return self_t.elem.tolist()
        if on_sim and name == "cpu":
            self.record("cpu")
            return self_t.elem.clone()
        if name == "cuda" and self_t is not None:
            return self_t if on_sim else SimTensor(self_t.clone())
        if name == "to" and self_t is not None:
            target = kwargs.get("device")
            for a in args[1:]:
                if isinstance(a, (str, torch.device)):
                    target = a
                elif isinstance(a, torch.Tensor):
                    target = a.device
            if target is not None and _is_cuda(target) and not on_sim:
                out = func(self_t, *tree_map(_host_device, args[1:]), **tree_map(_host_device, kwargs))
                return SimTensor(out if out is not self_t else out.clone())
            return func(*args, **kwargs)  # dtype changes, and copies to the host (recorded by the dispatch)
        if on_sim and name == "__setitem__":  # t[i] = value: Python numbers become device scalars, host tensors copies
            unwrap = lambda x: x.elem if isinstance(x, SimTensor) else x  # noqa: E731
            self_t.elem.__setitem__(*tree_map(unwrap, args[1:]))
            return None
        if on_sim and name == "__getitem__":  # t[[3, 1]]: torch builds list indices on t's device (real meta here)
            def as_index(i):  # a CPU index tensor (CUDA accepts those); [] is an empty long index, as torch reads it
                return (torch.tensor(i) if i else torch.zeros(0, dtype=torch.long)) if isinstance(i, list) else i

            index = args[1]
            index = tuple(map(as_index, index)) if isinstance(index, tuple) else as_index(index)
            return func(self_t, index)
        if func in _RUN_UNWRAPPED and any(isinstance(a, SimTensor) for a in _leaves((args, kwargs))):
            if any(isinstance(a, torch.Tensor) and not isinstance(a, SimTensor) and a.dim() > 0
                   for a in _leaves((args, kwargs))):  # fmt: skip
                self.record("mixed", f"{name}: device and host tensors")
            unwrap = lambda x: x.elem if isinstance(x, SimTensor) else x  # noqa: E731
            out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
            return tree_map(lambda x: SimTensor(x) if isinstance(x, torch.Tensor) else x, out)
        if _is_cuda(kwargs.get("device")) and name != "_parse_to":  # factories: torch.zeros(..., device="cuda") and friends
            out = func(*args, **{**kwargs, "device": torch.device("cpu")})
            return tree_map(lambda x: SimTensor(x) if isinstance(x, torch.Tensor) else x, out)
        return func(*args, **kwargs)
