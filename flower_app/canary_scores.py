"""How an observer scores the audit's canaries on a model it holds (one implementation).

The ServerApp scores the models it holds (FedAvg, gossip's open relay); under
`gossip-relay=sealed` each node scores its own model, so both call this, and a sealed and an
open run with the same seeds give the same scores bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flower_app.model import build_model

BATCH = 1024


def canary_scores(
    model_name: str, arrays: Sequence[np.ndarray], images: torch.Tensor, labels: torch.Tensor
) -> np.ndarray:
    """Minus each canary's cross-entropy at its label under the model: high = "in"."""
    model = build_model(model_name)
    keys = list(model.state_dict())
    model.load_state_dict(
        {k: torch.tensor(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)}
    )
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(labels), BATCH):
            logits = model(images[start : start + BATCH])
            loss = torch.nn.functional.cross_entropy(
                logits, labels[start : start + BATCH], reduction="none"
            )
            out.append(-loss.double().numpy())
    return np.concatenate(out) if out else np.zeros(0)
