"""Process start-up: megatron-core's import without its eager ``torch.compile`` calls.

megatron-core decorates about 40 fusion functions with ``torch.compile`` (``megatron.core.jit``)
while ``megatron.core`` is imported, and the first such call imports ``torch._dynamo`` and
``torch._inductor``: about 1.1 s of every process's start (measured on a 2-core CPU: 2.8 s ->
1.7 s for ``import megatron.core``), paid by every launch of every job and tool whether or not a
fused function ever runs. While ``megatron.core`` itself is imported, ``torch.compile`` of a
plain function is deferred to the function's first call; ``torch.compile`` compiles lazily at
the first call anyway, so what runs is the same. Nothing changes if megatron-core was imported
before this package.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import sys

_TARGET = "megatron.core"


def _deferred(compile_fn):
    def compile_later(model=None, **options):
        if model is None:  # @torch.compile(mode=...): the decorator
            return lambda fn: compile_later(fn, **options)
        if not inspect.isfunction(model):
            return compile_fn(model, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(model, **options)
            return compiled(*args, **kwargs)

        return call

    return compile_later


class _DeferringLoader(importlib.abc.Loader):
    """Runs ``megatron.core``'s package module with ``torch.compile`` deferred."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        import torch

        eager = torch.compile
        torch.compile = _deferred(eager)
        try:
            self.loader.exec_module(module)
        finally:
            torch.compile = eager

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self.loader, name)


class _MegatronFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _DeferringLoader(spec.loader)
        return spec


def defer_compile_during_megatron_import() -> None:
    if _TARGET not in sys.modules and not any(isinstance(f, _MegatronFinder)
                                              for f in sys.meta_path):
        sys.meta_path.insert(0, _MegatronFinder())
