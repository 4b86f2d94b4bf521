"""Evaluation: attacks by name, metrics, reliability checks, reports, and the one-call API.

`robal.evaluate` is this package and also the API's entry point: `robal.evaluate(model, data, ...)` calls
`robal.evaluate.api.evaluate` (a package cannot be a function, so the package's module object is made callable).
"""
import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .api import evaluate

        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
