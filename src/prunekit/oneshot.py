"""Deprecated alias of :mod:`prunekit.calibrate.oneshot` (the one-shot flow lives in ``calibrate/``).

Kept so that ``import prunekit.oneshot`` in existing code keeps working; it is the same module object.
"""

import sys

from prunekit.calibrate import oneshot as _real

sys.modules[__name__] = _real
