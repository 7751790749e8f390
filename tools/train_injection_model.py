"""Fit the injection model on the corpus's train split and write shared/models/injection_tfidf.npz.

    .venv/bin/python tools/train_injection_model.py

Only rows with split == "train" are used: the "test" rows stay unseen, for the figures
`baton eval guard` reports.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.guardrail.evaluate import load_corpus  # noqa: E402
from services.guardrail.injection_model import WEIGHTS_PATH, train  # noqa: E402

rows = [row for row in load_corpus() if row.split == "train"]
weights = train([row.text for row in rows], [row.label for row in rows])
weights.save()
print(f"{len(rows)} train rows, {len(weights.vocabulary)} terms -> {WEIGHTS_PATH} ({WEIGHTS_PATH.stat().st_size / 1e3:.0f} kB)")
