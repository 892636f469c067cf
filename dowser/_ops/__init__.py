"""Op declarations and their backends: one module per op, one module per backend.

``dowser/_ops/<op>.py`` declares the op once (schema, fake kernel, reference, self-check
inputs); ``dowser/_ops/backends/<backend>.py`` registers that backend's kernels per device.
Importing this package declares every op with torch.library and registers every kernel.
The public functions live in dowser.ops.
"""

from dowser._ops import (count_nonfinite, masked_adamw_step, masked_sgd_step,  # noqa: F401
                         pack_mask, scores, select_mask, select_masks_global, unpack_mask)
from dowser._ops.backends import cpp, cuda, triton  # noqa: F401  (after the declarations)
