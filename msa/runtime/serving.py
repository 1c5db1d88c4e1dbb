"""The logged MLflow model: ``mlflow.pyfunc.load_model(uri).predict(df)`` returns embeddings.

Input is a DataFrame with a ``text`` column (captions) and/or an ``image`` column (encoded image
bytes); each row is embedded by whichever it has (text wins when both are set). Output is an
[N, D] float32 array of L2-normalised embeddings in the shared retrieval space.
"""

from __future__ import annotations

import io
from pathlib import Path

import mlflow.pyfunc
import numpy as np

_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_ARTIFACT = "checkpoint"
TOKENIZER_ARTIFACT = "tokenizer"


class MSAEmbedder(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from msa.runtime.resolver import resolve_model

        loaded = resolve_model(context.artifacts[CHECKPOINT_ARTIFACT], "cpu",
                               tokenizer_dir=context.artifacts[TOKENIZER_ARTIFACT])
        self.model, self.cfg, self.tokenizer, self.transform = loaded.model, loaded.cfg, loaded.tokenizer, loaded.transform
        self.torch = torch

    def predict(self, context, model_input, params=None) -> np.ndarray:
        from PIL import Image

        from msa.encoders import tokenize

        torch = self.torch
        n = len(model_input)
        texts = model_input["text"] if "text" in model_input else [None] * n
        images = model_input["image"] if "image" in model_input else [None] * n
        out = np.zeros((n, self.model.text.hidden_size), dtype=np.float32)
        text_rows = [i for i, t in enumerate(texts) if isinstance(t, str)]
        image_rows = [i for i in range(n) if i not in set(text_rows) and images[i] is not None]
        missing = sorted(set(range(n)) - set(text_rows) - set(image_rows))
        if missing:
            raise ValueError(f"rows {missing[:10]} have neither a 'text' string nor 'image' bytes")
        with torch.no_grad():
            if text_rows:
                ids, mask = tokenize(self.tokenizer, [texts[i] for i in text_rows], self.cfg.text.max_tokens)
                out[text_rows] = self.model.encode_text(ids, mask)[0].numpy()
            if image_rows:
                pixels = torch.stack(
                    [self.transform(Image.open(io.BytesIO(bytes(images[i])))) for i in image_rows]
                )
                out[image_rows] = self.model.encode_image(pixels)[0].numpy()
        return out


def signature(dim: int):
    """Explicit schema, so logging needs no example run of the model."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("string", "text", required=False), ColSpec("binary", "image", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]),
    )


def log_pyfunc_model(checkpoint_dir: str | Path, tokenizer_dir: str | Path, dim: int, name: str = "model") -> str:
    """Log under the active run; returns the model URI (models:/m-... in MLflow 3)."""
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=MSAEmbedder(),
        artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_dir), TOKENIZER_ARTIFACT: str(tokenizer_dir)},
        code_paths=[str(_ROOT / "msa"), str(_ROOT / "shards")],  # the model loads through msa.runtime.resolver
        signature=signature(dim),
    )
    return info.model_uri
