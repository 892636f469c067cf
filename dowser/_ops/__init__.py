"""Op declarations and their backends, one op family per module.

Importing this package declares every op with torch.library and registers its kernels.
The public functions live in dowser.ops.
"""

from dowser._ops import pack  # noqa: F401
from dowser._ops import optim  # noqa: F401  (masked optimizer steps)
