"""Deprecated alias of :mod:`prunekit.calibrate.sparsegpt` (the one-shot flow lives in ``calibrate/``).

Kept so that ``import prunekit.sparsegpt`` in existing code keeps working; it is the same module object.
"""

import sys

from prunekit.calibrate import sparsegpt as _real

sys.modules[__name__] = _real
