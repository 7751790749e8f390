"""Fit the encoder risk head on the routes' examples and write shared/models/risk_encoder_head.npz.

    .venv/bin/python tools/train_risk_encoder.py [CONFIG.yaml]

Every example of the `high_risk` route against the examples of all other routes (the config's
own and the dev part of tests/data/routing*.jsonl that tools/merge_routing_examples.py put
there; never a held-out prompt), each embedded by the contextual encoder (shared/encoder.py).
Run it again after the examples change.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.router.risk import RISK_ROUTE  # noqa: E402
from services.router.risk_model import MODEL_PATH, fit_head, save_head  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.encoder import shared_encoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(config_path: str) -> None:
    config = load_config(config_path)
    texts, labels = [], []
    for name, route in config.routes.items():
        for text in route.examples:
            texts.append(text)
            labels.append(name == RISK_ROUTE)
    started = time.process_time()
    encoder = shared_encoder()
    embeddings = np.stack([encoder.embed(text) for text in texts])
    weights, bias = fit_head(embeddings, np.array(labels))
    save_head(weights, bias, source=f"{Path(config_path).name}: {sum(labels)} high_risk examples, {len(labels) - sum(labels)} others")
    print(f"{sum(labels)} high-risk / {len(labels) - sum(labels)} other examples -> {MODEL_PATH.relative_to(ROOT)} "
          f"({time.process_time() - started:.0f} s CPU)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "shared" / "default_config.yaml"))
