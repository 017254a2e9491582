"""transformers' ``eager`` experts under torch.compile: trace its ``grouped_mm`` implementation.

transformers picks an experts implementation per model (``config._experts_implementation``):
``eager`` is the class's own forward, a Python loop over ``nonzero()`` that dynamo cannot capture
(a graph break per layer, data-dependent shapes), while ``grouped_mm`` and ``batched_mm`` are the
same function written as tensor code, which transformers itself offers as drop-in replacements
for every experts class it decorates with ``use_experts_implementation``. So while dynamo traces
(``torch.compiler.is_compiling()``, never in eager), ``eager`` is dispatched as
``config.transformers_eager_experts`` instead, which the patterns then rewrite. Eager runs, other
implementations and experts classes transformers does not dispatch (a user's own forward) are
untouched. The patch goes in when ``import inductor_moe`` finds transformers' dispatch module
loaded, or else right after transformers loads it.
"""

import importlib.abc
import importlib.util
import logging
import sys

import torch

from . import config

log = logging.getLogger(__name__)

_MODULE = "transformers.integrations.moe"


def _install(interface: type) -> None:
    original = interface.get_interface

    def get_interface(self, experts_implementation, default):
        # dynamo guards on the config values it reads here: changing them recompiles
        if experts_implementation == "eager" and torch.compiler.is_compiling() and config.enabled:
            experts_implementation = config.transformers_eager_experts or experts_implementation
        return original(self, experts_implementation, default)

    interface.get_interface = get_interface
    log.debug("transformers' eager experts dispatch as config.transformers_eager_experts under torch.compile")


class _InstallOnImport(importlib.abc.MetaPathFinder):
    """Patches transformers' experts dispatch as soon as transformers imports it."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)  # the module imports once; let the usual finders find it
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                _install(module.ExpertsInterface)

            spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Patch transformers' experts dispatch now if it is imported, else when it is."""
    if _MODULE in sys.modules:
        _install(sys.modules[_MODULE].ExpertsInterface)
    elif not any(isinstance(finder, _InstallOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _InstallOnImport())


def eager_experts(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(module name, class name) of every transformers-dispatched experts module of ``model`` that
    runs its ``eager`` implementation."""
    return [
        (name, type(module).__name__)
        for name, module in model.named_modules()
        if hasattr(module, "is_concatenated") and getattr(getattr(module, "config", None),
                                                         "_experts_implementation", None) == "eager"
    ]
