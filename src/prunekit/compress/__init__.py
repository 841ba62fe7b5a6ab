"""Storage: quantization that keeps zeros, compressed sparse formats, save / load without pickle.

The package is also callable: ``prunekit.compress(model, recipe, ...)`` runs a whole recipe (see
:func:`prunekit.recipes.compress`), while ``prunekit.compress.size_report`` and the submodules
stay where they were.
"""

import sys
import types

from prunekit.compress.size import size_report

__all__ = ["size_report"]


class _CallablePackage(types.ModuleType):
    """Lets ``prunekit.compress(...)`` run the recipe pipeline without hiding the package."""

    def __call__(self, *args, **kwargs):
        from prunekit.recipes.runner import compress

        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
