"""Import hook that makes stock ``mergekit-yaml`` see ``fusechat_sce``.

mergekit 0.1.5 has no plugin entry points, so the installed ``fusechat_merge_hook.pth``
imports this module at interpreter start. It must stay cheap: it imports neither torch
nor mergekit. It only watches for mergekit's own imports and then

* registers ``fusechat_sce`` right after ``mergekit.merge_methods`` is executed, and
* wraps ``mergekit.merge.run_merge`` so that ``fusechat_sce`` recipes are checked
  before any model is loaded and written atomically (see `fusechat_merge.merging`).

Set ``FUSECHAT_MERGE_NO_HOOK=1`` to disable it.
"""

from __future__ import annotations

import os
import sys
from types import FunctionType, ModuleType  # not typing: it costs ~8 ms at start-up


def _after_merge_methods(module: ModuleType) -> None:
    adapter = sys.modules.get("fusechat_merge.mergekit_adapter")
    if adapter is not None and not hasattr(adapter, "register"):
        return  # the adapter, imported first, imports mergekit itself: it registers when it is made
    from fusechat_merge.mergekit_adapter import register

    register()


def _after_merge(module: ModuleType) -> None:
    from fusechat_merge.merging import wrap_run_merge

    module.run_merge = wrap_run_merge(module.run_merge)


_AFTER_IMPORT: dict[str, FunctionType] = {
    "mergekit.merge_methods": _after_merge_methods,
    "mergekit.merge": _after_merge,
}


class _LoaderWithCallback:
    """Delegates to the real loader, then runs a callback on the executed module.

    Plain classes, not ``importlib.abc`` subclasses: importing that costs ~18 ms at every
    interpreter start.
    """

    def __init__(self, loader, callback: FunctionType):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _MergekitWatcher:
    def find_spec(self, fullname, path, target=None):
        callback = _AFTER_IMPORT.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _LoaderWithCallback(spec.loader, callback)
        return spec


def installed() -> bool:
    """Whether the watcher is installed in this interpreter."""
    return any(isinstance(f, _MergekitWatcher) for f in sys.meta_path)


def install() -> None:
    """Install the watcher once; if mergekit is already imported, act now."""
    if installed():
        return
    sys.meta_path.insert(0, _MergekitWatcher())
    for name, callback in _AFTER_IMPORT.items():
        module = sys.modules.get(name)
        if module is not None:
            callback(module)


if os.environ.get("FUSECHAT_MERGE_NO_HOOK", "") not in ("1", "true", "yes"):
    install()
