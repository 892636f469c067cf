"""dowser::scores: the materialised fp32 scores S = |W| * (Psi^T diag(w) A) / sum(w).

For tests and small layers; the selection ops never hold S.
"""

from __future__ import annotations

import torch

from dowser import reference
from dowser._ops._inputs import exact_layer
from dowser._registry import define
from dowser.selfcheck import add_case


def _fake(weight, out_factors, in_factors, batch_weights):
    return weight.new_empty(weight.shape, dtype=torch.float32)


op = define("scores", "(Tensor weight, Tensor out_factors, Tensor in_factors, "
            "Tensor batch_weights) -> Tensor", reference.scores, _fake)

add_case("scores", exact_layer)
