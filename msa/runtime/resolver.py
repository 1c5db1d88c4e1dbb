"""The one way to get a trained model: a checkpoint directory (local or s3://) or an MLflow model URI.

Evaluation, promotion, retrieval and serving all load through ``resolve_model``, so a model is
always rebuilt the same way: architecture from the stored config (no hub), weights from the
checkpoint, tokenizer from the model's own files, the version pinned when it came from the registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from msa.checkpoint import (
    CHECKPOINT_FILE,
    MANIFEST_FILE,
    CorruptCheckpointError,
    load_checkpoint,
    model_from_checkpoint,
)
from msa.config import MSAConfig
from msa.data import ImageTransform
from msa.encoders import build_tokenizer, tokenize
from msa.model import MSAModel
from msa.runtime.weights import materialize_weights
from shards.storage import Store, is_remote

_MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a file of the checkpoint directory, never a path


@dataclass
class ResolvedModel:
    """A model ready to embed queries: network (eval mode, on ``device``), config, tokenizer, transform."""

    model: MSAModel
    cfg: MSAConfig
    tokenizer: Any
    device: torch.device
    source: str  # as given
    resolved: str  # pinned: absolute checkpoint dir, or models:/<name>/<version>
    registry: dict[str, Any] | None = None  # name, version, alias, run_id when from the MLflow registry
    checkpoint_epoch: int | None = None
    trained_on: str | None = None  # dataset digest stored in the checkpoint
    transform: ImageTransform = field(init=False)

    def __post_init__(self) -> None:
        self.transform = ImageTransform.from_config(self.cfg)

    @property
    def embed_dim(self) -> int:
        return self.model.text.hidden_size

    @property
    def scale_dims(self) -> tuple[int, ...]:
        return tuple(self.model.image.stage_dims)

    @torch.no_grad()
    def encode_texts(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(cls [B, D] L2-normalised, tokens [B, L-1, D], MSCMAT key padding mask or None)."""
        ids, mask = tokenize(self.tokenizer, list(captions), self.cfg.text.max_tokens)
        ids, mask = ids.to(self.device), mask.to(self.device)
        cls, tokens = self.model.encode_text(ids, mask)
        padding = (mask[:, 1 : 1 + tokens.shape[1]] == 0) if self.model.use_padding_mask else None
        return cls.float(), tokens, padding

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        v, scales = self.model.encode_image(pixels.to(self.device))
        return v.float(), [s.float() for s in scales]

    @torch.no_grad()
    def mscmat_mean(
        self,
        scale_feats: Sequence[torch.Tensor],
        tokens: torch.Tensor,
        cls: torch.Tensor,
        padding: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mean over the K scales of MSCMAT's scores, [B_img, B_cap], exactly as ``MSAModel.forward``."""
        return self.model.mscmat(list(scale_feats), tokens, cls, key_padding_mask=padding).float().mean(0)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_mlflow_uri(source: str) -> bool:
    return str(source).startswith(_MLFLOW_SCHEMES)


def resolve_model(
    model_source: str | os.PathLike[str],
    device: str | torch.device | None = None,
    *,
    storage_options: dict | None = None,
    mlflow_uri: str | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> ResolvedModel:
    """A checkpoint directory (local or ``s3://``, holding checkpoint.pt) or an MLflow model URI -> model.

    MLflow URIs: ``models:/msa-retrieval/3``, ``models:/msa-retrieval@champion``,
    ``models:/msa-retrieval/latest`` (registry; the version is resolved and pinned) or any other URI
    ``mlflow.artifacts.download_artifacts`` accepts (``models:/m-<id>``, ``runs:/<run>/model``). The
    tracking store is ``mlflow_uri``, else MLFLOW_TRACKING_URI, else the project's default (.msa/mlflow.db).
    Every caller that needs a trained model (evaluation, promotion, retrieval, serving) comes here.
    ``tokenizer_dir`` overrides the tokenizer of a local checkpoint (a logged model carries its own).
    """
    source = str(model_source)
    device = torch.device(device) if device is not None else default_device()
    registry = None
    if is_mlflow_uri(source):
        with tempfile.TemporaryDirectory(prefix="msa-model-") as tmp:
            checkpoint_dir, tokenizer_dir, resolved, registry = _download_mlflow_model(source, Path(tmp), mlflow_uri)
            state = load_checkpoint(checkpoint_dir, map_location="cpu")
            model, cfg, _ = _rebuild(state, storage_options)
            tokenizer = build_tokenizer(str(tokenizer_dir))
    elif is_remote(source):
        with tempfile.TemporaryDirectory(prefix="msa-model-") as tmp:
            try:
                state = load_checkpoint(_fetch_checkpoint(source, Path(tmp), storage_options), map_location="cpu")
            except CorruptCheckpointError as exc:  # name the remote directory, not the temporary copy
                raise CorruptCheckpointError(source, exc.problem) from None
            except FileNotFoundError:
                raise FileNotFoundError(f"{source}: no MSA checkpoint here (no {CHECKPOINT_FILE})") from None
        model, cfg, local_cfg = _rebuild(state, storage_options)
        tokenizer = build_tokenizer(local_cfg)
        resolved = source
    else:
        directory = Path(source).expanduser()
        if directory.is_file() and directory.name.endswith(".pt"):
            directory = directory.parent
        if not directory.is_dir():
            raise FileNotFoundError(
                f"model source {source!r}: no such checkpoint directory (expected a directory holding "
                f"checkpoint.pt, or an MLflow URI such as models:/msa-retrieval@champion)"
            )
        resolved = str(directory.resolve())
        state = load_checkpoint(directory, map_location="cpu")
        model, cfg, local_cfg = _rebuild(state, storage_options)
        tokenizer = build_tokenizer(str(tokenizer_dir) if tokenizer_dir else local_cfg)
    model.to(device).eval()
    return ResolvedModel(
        model=model,
        cfg=cfg,
        tokenizer=tokenizer,
        device=device,
        source=source,
        resolved=resolved,
        registry=registry,
        checkpoint_epoch=state.get("epoch"),
        trained_on=state.get("dataset_digest"),
    )


def _rebuild(state: dict[str, Any], storage_options: dict | None) -> tuple[MSAModel, MSAConfig, MSAConfig]:
    """(model, config as stored, config with local paths): a stored config may name a shared ``s3://`` text model
    (``msa weights fetch``), copied once to this node for its config and tokenizer; the weights are the checkpoint's."""
    cfg = MSAConfig.from_dict(state["config"])
    local_cfg = materialize_weights(cfg, storage_options, fields=("text.model", "text.tokenizer"))
    model, _ = model_from_checkpoint({**state, "config": local_cfg.to_dict()})
    return model, cfg, local_cfg


def _parse_registry_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """models:/name/3 -> (name, "3", None); models:/name@alias -> (name, None, alias); else None."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/([^/]+)|@([^/]+))/?", uri)
    if not match:
        return None
    return match[1], match[2], match[3]


def _fetch_checkpoint(checkpoint_uri: str, into: Path, storage_options: dict | None) -> Path:
    """Local copy of a remote checkpoint directory: checkpoint.pt and, when it has one, its manifest and
    every plain file name the manifest lists, so that ``load_checkpoint`` checks their sizes and sha256
    as it does for a local directory."""
    store = Store(checkpoint_uri, storage_options)
    names = {CHECKPOINT_FILE}
    manifest = store.read_bytes(MANIFEST_FILE)
    if manifest is not None:
        (into / MANIFEST_FILE).write_bytes(manifest)
        with contextlib.suppress(ValueError, AttributeError, TypeError):  # a garbled manifest: load_checkpoint says so
            names |= {n for n in json.loads(manifest).get("files", {}) if _PLAIN_NAME.fullmatch(n)}
    for name in sorted(names):
        store.download(name, into / name)  # retried while the endpoint fails; an absent file is reported missing
    return into


def _download_mlflow_model(
    uri: str, into: Path, mlflow_uri: str | None
) -> tuple[Path, Path, str, dict[str, Any] | None]:
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from msa.runtime.serving import CHECKPOINT_ARTIFACT, TOKENIZER_ARTIFACT
    from msa.runtime.tracking import use_tracking

    tracking_uri = use_tracking(mlflow_uri)
    registry, pinned = None, uri
    parsed = _parse_registry_uri(uri)
    try:
        if parsed is not None:
            name, version, alias = parsed
            client = MlflowClient()
            if alias is not None:
                mv = client.get_model_version_by_alias(name, alias)
            elif version == "latest":
                versions = client.search_model_versions(f"name='{name}'")
                if not versions:
                    raise MlflowException(f"registered model {name!r} has no versions")
                mv = max(versions, key=lambda v: int(v.version))
            else:
                mv = client.get_model_version(name, version)
            registry = {"name": name, "version": str(mv.version), "alias": alias, "run_id": mv.run_id}
            pinned = f"models:/{name}/{mv.version}"
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(into)))
    except MlflowException as e:
        raise FileNotFoundError(f"MLflow model {uri!r} (tracking store {tracking_uri}): {e.message}") from e

    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        raise FileNotFoundError(f"MLflow model {uri!r}: downloaded to {local} but it has no MLmodel file")
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    artifacts = flavor.get("artifacts") or {}

    def artifact(name: str) -> Path:
        path = local / artifacts.get(name, {}).get("path", f"artifacts/{name}")
        if not path.exists():
            raise FileNotFoundError(
                f"MLflow model {uri!r} lacks its {name!r} artifact ({path}); is it an msa.runtime.serving model?"
            )
        return path

    return artifact(CHECKPOINT_ARTIFACT), artifact(TOKENIZER_ARTIFACT), pinned, registry
