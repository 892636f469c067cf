"""Op declarations and their backends, one op family per module.

Importing this package declares every op with torch.library and registers its kernels.
The public functions live in dowser.ops.
"""

from dowser._ops import pack  # noqa: F401
from dowser._ops import select  # noqa: F401  (issue 4: scores and bottom-rho masks)
from dowser._ops import optim  # noqa: F401  (masked optimizer steps)
