"""The logged MLflow model: ``mlflow.pyfunc.load_model(uri).predict(df)`` returns embeddings.

Input is a DataFrame with a ``text`` column (captions) and/or an ``image`` column (encoded image
bytes); each row is embedded by whichever it has (text wins when both are set). Output is an
[N, D] float32 array of L2-normalised embeddings in the shared retrieval space.

The model is logged as code (MLflow models-from-code): ``serving_model.py`` is stored with the model
and builds an ``MSAEmbedder`` when loaded, so nothing is pickled; the weights travel as the
``checkpoint`` artifact (a plain-data checkpoint, loaded with ``weights_only=True``) and the
tokenizer as the ``tokenizer`` artifact. Requirements are pinned from the installed versions
(``pip_requirements()``), so logging spends no time inferring them.
"""

from __future__ import annotations

import importlib.metadata
import io
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

_ROOT = Path(__file__).resolve().parents[2]
MODEL_CODE = Path(__file__).resolve().with_name("serving_model.py")  # the file MLflow logs and runs
CHECKPOINT_ARTIFACT = "checkpoint"
TOKENIZER_ARTIFACT = "tokenizer"
# What the served model imports (distribution names); pinned to the installed versions when logged.
REQUIREMENTS = ("torch", "torchvision", "timm", "transformers", "open-clip-torch", "pillow", "numpy", "pandas",
                "mlflow")


class MSAEmbedder(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from msa.runtime.resolver import resolve_model

        loaded = resolve_model(context.artifacts[CHECKPOINT_ARTIFACT], "cpu",
                               tokenizer_dir=context.artifacts[TOKENIZER_ARTIFACT])
        self.model, self.cfg = loaded.model, loaded.cfg
        self.tokenizer, self.transform = loaded.tokenizer, loaded.transform
        self.torch = torch

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
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
    """Explicit schema: both columns optional, which MLflow would not infer from the input example."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("string", "text", required=False), ColSpec("binary", "image", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]),
    )


def pip_requirements() -> list[str]:
    """``name==version`` for each installed distribution of REQUIREMENTS (local labels such as
    ``+cu130`` dropped: they are not on PyPI); ones not installed are left out."""
    pins = []
    for dist in REQUIREMENTS:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        pins.append(f"{dist}=={version.split('+', 1)[0]}")
    return pins


def input_example() -> pd.DataFrame:
    """A caption row and an image row (a 16 px PNG), stored with the model to show its input.

    The caption row's image is empty bytes, not None: MLflow cannot read a null back from a binary
    column of a stored example (text wins in that row anyway).
    """
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (16, 16), (64, 112, 48)).save(png, format="PNG")
    return pd.DataFrame({"text": ["a river through farmland", None], "image": [b"", png.getvalue()]})


def log_pyfunc_model(checkpoint_dir: str | Path, tokenizer_dir: str | Path, dim: int, name: str = "model") -> str:
    """Log under the active run; returns the model URI (models:/m-... in MLflow 3)."""
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),  # models-from-code: the file is stored and run at load, nothing pickled
        artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_dir), TOKENIZER_ARTIFACT: str(tokenizer_dir)},
        code_paths=[str(_ROOT / "msa"), str(_ROOT / "shards")],  # loaded through msa.runtime.resolver
        signature=signature(dim),
        input_example=input_example(),
        pip_requirements=pip_requirements(),
    )
    return info.model_uri
