"""Loading and saving weights.

Official `sam_vit_{b,l,h}_*.pth` files are bare state dicts; ours is one file holding
{"format", "config", "meta", "model"} with the official key names, so it also loads
into the official classes built with the same dimensions. Everything goes through
`torch.load(weights_only=True)`: a file carrying arbitrary pickled objects is refused."""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import CONFIGS, SamConfig, get_config
from .sam import Sam

FORMAT = "samengine-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason."""


def load_checkpoint(
    path: str | os.PathLike, model_type: str | None = None, device: str | torch.device = "cpu"
) -> tuple[Sam, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights strictly.

    model_type names the config of an official (bare state dict) file; without it the
    config is inferred from the tensor shapes. Returns the model (eval mode) and the
    checkpoint's metadata ({} for official files)."""
    config, state, meta = _describe(path, model_type)
    model = Sam(config)
    load_weights(model, state, path)
    return model.to(device).eval(), meta


def read_checkpoint_config(path: str | os.PathLike, model_type: str | None = None) -> SamConfig:
    """The config of the model a checkpoint holds, without building it (the file is memory-
    mapped, not read into memory: cheap even for vit_h). CheckpointError when its weights
    do not fit that config, as load_checkpoint would find."""
    return _describe_checked(path, model_type)[0]


def read_checkpoint_meta(path: str | os.PathLike, model_type: str | None = None) -> dict[str, Any]:
    """The metadata of a checkpoint ({} for official files), without building the model
    (memory-mapped, like read_checkpoint_config, and checked like it)."""
    return _describe_checked(path, model_type)[1]


def _describe_checked(path: str | os.PathLike, model_type: str | None) -> tuple[SamConfig, dict[str, Any]]:
    config, state, meta = _describe(path, model_type, mmap=True)
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        expected = Sam(config).state_dict()
    _check_fit(config, expected, state, path)
    return config, meta


def _describe(path: str | os.PathLike, model_type: str | None, mmap: bool = False
              ) -> tuple[SamConfig, dict[str, torch.Tensor], dict[str, Any]]:
    obj = _read(Path(path), mmap)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format version {obj['format_version']} is newer than this code")
        try:
            config = SamConfig(**obj["config"])
        except Exception as e:  # pydantic ValidationError or missing key
            raise CheckpointError(f"{path}: invalid model config in checkpoint: {e}") from e
        if model_type is not None and model_type != config.name:
            raise CheckpointError(f"{path}: holds a {config.name!r} model, not {model_type!r}")
        return config, obj["model"], dict(obj.get("meta") or {})
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return (get_config(model_type) if model_type else infer_config(obj, path)), obj, {}
    raise CheckpointError(f"{path}: not a SAM checkpoint (expected a state dict or a {FORMAT} file)")


def save_checkpoint(model: Sam, path: str | os.PathLike, meta: dict[str, Any] | None = None,
                    endpoint_url: str | None = None) -> str:
    """Write model weights, config and JSON-like metadata to a local path or an s3:// URI
    (save_file); returns the file's sha256."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.model_dump(mode="json"),
        "meta": meta or {},
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    return save_file(payload, path, endpoint_url)


def save_file(payload: Any, path: str | os.PathLike, endpoint_url: str | None = None) -> str:
    """torch.save payload to a local path or an s3:// URI; returns the file's sha256. Never a
    half-written file under the real name: locally it is renamed into place; to S3 it is
    written locally first and uploaded (endpoint_url or AWS_ENDPOINT_URL), so a reader sees
    the old object or the whole new one."""
    from dataset.storage import is_s3, s3_filesystem  # here: importing model stays light

    check_checkpoint_path(path)
    if is_s3(path):
        with tempfile.TemporaryDirectory(prefix="samengine-checkpoint-") as folder:
            local = Path(folder) / "checkpoint.pt"
            torch.save(payload, local)
            digest = file_sha256(local)
            s3_filesystem(endpoint_url).put_file(str(local), str(path).split("://", 1)[1])
            return digest
    path = Path(str(path).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return file_sha256(path)


def local_checkpoint(uri: str, endpoint_url: str | None = None) -> str:
    """A local path of the checkpoint; an s3:// one is downloaded once per node into the
    temp folder (keyed by its URI and ETag, written atomically). CheckpointError naming the
    URI when the object cannot be fetched (missing, forbidden, endpoint unreachable)."""
    if not uri.startswith(("s3://", "s3a://")):
        return uri
    from botocore.exceptions import BotoCoreError

    from dataset.storage import s3_filesystem  # here: importing model stays light

    fs = s3_filesystem(endpoint_url)
    path = uri.split("://", 1)[1]
    try:
        tag = hashlib.sha256(f"{uri}|{fs.info(path).get('ETag')}".encode()).hexdigest()[:16]
        local = os.path.join(tempfile.gettempdir(), "samengine-checkpoints", f"{tag}-{os.path.basename(path)}")
        if not os.path.exists(local):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            tmp = f"{local}.{os.getpid()}.part"
            fs.get_file(path, tmp)
            shutil.move(tmp, local)
    except FileNotFoundError as e:  # s3fs names the key, or says that the bucket does not exist
        detail = "" if str(e) in ("", path) else f" ({e})"
        raise CheckpointError(f"{uri}: checkpoint file not found{detail}") from None
    except (BotoCoreError, OSError) as e:
        raise CheckpointError(f"{uri}: cannot fetch the checkpoint: {e}") from e
    return local


def checkpoint_problem(uri: str, error: Exception) -> str:
    """The one line of a checkpoint error naming uri once: the errors of a fetched s3://
    checkpoint's contents name its local copy; those of a local file start with its path."""
    text = str(error)
    return text if text.startswith(str(uri)) else f"{uri}: {text}"


def check_checkpoint_path(path: str | os.PathLike) -> None:
    """CheckpointError for a destination that is neither a local path nor an s3:// URI
    (pathlib would make a local folder named after its scheme); jobs call it before any work."""
    from dataset.storage import is_s3

    text = str(path)
    if "://" in text and not is_s3(text) and not text.startswith("file://"):
        raise CheckpointError(f"{path}: a checkpoint is written to a local path or an s3:// URI, "
                              f"not a {text.split('://', 1)[0]}:// one")
    if is_s3(text) and (len(text.split("://", 1)[1].split("/", 1)) < 2 or text.endswith("/")):
        raise CheckpointError(f"{path}: an s3:// checkpoint destination names a bucket and a key")


def load_weights(model: Sam, state: dict[str, torch.Tensor], source: Any = "state dict") -> None:
    """Strict load with an error that lists what does not match."""
    _check_fit(model.config, model.state_dict(), state, source)
    model.load_state_dict(state, strict=True)


def _check_fit(config: SamConfig, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
               source: Any) -> None:
    """CheckpointError listing the keys and shapes of state that do not match expected."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected.keys() & state.keys()
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise CheckpointError(f"{source}: weights do not fit a {config.name!r} model: " + "; ".join(parts))


def infer_config(state: dict[str, torch.Tensor], source: Any = "state dict") -> SamConfig:
    """Recover the architecture of a bare state dict from its tensor shapes (named
    configs are returned as themselves when they match). The decoder's head count leaves
    no trace in the shapes; the official 8 is assumed."""
    try:
        patch = state["image_encoder.patch_embed.proj.weight"]
        embed_dim, patch_size = patch.shape[0], patch.shape[-1]
        grid = state["image_encoder.pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
        rel = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in range(depth)]
        head_dim = rel[0].shape[1]
        global_idx = tuple(i for i, r in enumerate(rel) if r.shape[0] == 2 * grid - 1)
        local = [r.shape[0] for i, r in enumerate(rel) if i not in global_idx]
        window = (local[0] + 1) // 2 if local else 14
        prompt_dim = state["prompt_encoder.no_mask_embed.weight"].shape[1]
        dec_layers = 1 + max(
            int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.transformer.layers.")
        )
        fields = dict(
            image_size=grid * patch_size, patch_size=patch_size, encoder_embed_dim=embed_dim,
            encoder_depth=depth, encoder_num_heads=embed_dim // head_dim,
            encoder_global_attn_indexes=global_idx, window_size=window,
            prompt_embed_dim=prompt_dim,
            mask_in_chans=state["prompt_encoder.mask_downscaling.3.weight"].shape[0],
            decoder_depth=dec_layers,
            decoder_mlp_dim=state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            num_multimask_outputs=state["mask_decoder.mask_tokens.weight"].shape[0] - 1,
            iou_head_depth=1 + max(
                int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.iou_prediction_head.layers.")
            ),
            iou_head_hidden_dim=state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        )
        if "text_grounding.query.0.weight" in state:
            fields["text_embed_dim"] = state["text_grounding.query.0.weight"].shape[1]
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{source}: not a SAM state dict (cannot read its architecture: {e})") from e
    for config in CONFIGS.values():
        if config.model_dump(exclude={"name", "decoder_num_heads"}) == SamConfig(**fields).model_dump(
            exclude={"name", "decoder_num_heads"}
        ):
            return config
    return SamConfig(name="inferred", **fields)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read(path: Path, mmap: bool = False) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    _check_container(path)
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, OSError):  # legacy (pre-zip) files cannot be mapped: read them whole below
                pass
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than weights"
            f"{f' ({refused.group(1)})' if refused else ''}, which weights_only loading does not execute"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80  # the first byte of a pickle of protocol 2 or later (legacy torch.save files)


def _check_container(path: Path) -> None:
    """CheckpointError for a file that cannot be a checkpoint at all: empty, neither a zip
    archive (torch.save's format) nor a pickle (its legacy one), or a cut-off archive."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: the file is empty")
    if head == _ZIP_MAGIC:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: the checkpoint is truncated or corrupt (an incomplete zip archive); "
                                  "download or copy it again")
    elif head[0] != _PICKLE_PROTOCOL:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint: it starts with {head!r}, where torch.save "
                              "files start with a zip archive or a pickle")
