"""Checkpoint files: our format round-trips with weights_only, official bare state dicts
load, and bad files give clear errors."""
from __future__ import annotations

import pickle

import pytest
import torch

from model import (CheckpointError, Sam, get_config, load_checkpoint, read_checkpoint_config, read_checkpoint_meta,
                   save_checkpoint)
from model.checkpoint import infer_config
from tests.official import build_official, randomize


def _small(seed=0) -> Sam:
    torch.manual_seed(seed)
    return Sam(get_config("vit_tiny256"))


def test_roundtrip_keeps_config_meta_and_weights(tmp_path):
    model = _small()
    digest = save_checkpoint(model, tmp_path / "m.pt", meta={"seed": 7, "metrics": {"ar100": 0.5}})
    assert len(digest) == 64
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # loads with no custom classes
    assert raw["config"]["name"] == "vit_tiny256"
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta == {"seed": 7, "metrics": {"ar100": 0.5}}
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_our_weights_load_into_official_classes(tmp_path):
    model = _small()
    save_checkpoint(model, tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    official = build_official(get_config("vit_tiny256"))
    official.load_state_dict(raw["model"], strict=True)


def test_official_bare_state_dict_loads_and_config_is_inferred(tmp_path):
    config = get_config("vit_tiny256")
    official = build_official(config)
    randomize(official, seed=2)
    torch.save(official.state_dict(), tmp_path / "sam_small.pth")
    assert infer_config(official.state_dict()) == config
    loaded, meta = load_checkpoint(tmp_path / "sam_small.pth")
    assert meta == {} and loaded.config == config
    loaded, _ = load_checkpoint(tmp_path / "sam_small.pth", model_type="vit_tiny256")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "sam_small.pth", model_type="vit_b")


def test_inferred_config_of_unknown_architecture():
    config = get_config("vit_tiny256").model_copy(update={"encoder_depth": 3, "encoder_global_attn_indexes": (2,)})
    inferred = infer_config(Sam(config).state_dict())
    assert inferred.name == "inferred"
    # the decoder's head count leaves no trace in tensor shapes: the official 8 is assumed
    assert inferred.decoder_num_heads == 8
    assert inferred.model_dump(exclude={"name", "decoder_num_heads"}) == config.model_dump(
        exclude={"name", "decoder_num_heads"})


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(tmp_path):
    save_checkpoint(_small(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")


def test_garbage_file(tmp_path):
    """Files that cannot be checkpoints are named as such (not as pickles holding objects,
    whose advice would be to load them unsafely)."""
    (tmp_path / "g.pt").write_bytes(b"<html>not a checkpoint</html>")
    (tmp_path / "p.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, message in (("g.pt", "not a PyTorch checkpoint: it starts with b'<htm'"),
                          ("p.pt", "not a PyTorch checkpoint: it starts with b'\\x89PNG'"),
                          ("empty.pt", "the file is empty")):
        for load in (load_checkpoint, read_checkpoint_config):
            with pytest.raises(CheckpointError) as e:
                load(tmp_path / name)
            assert message in str(e.value) and "weights_only" not in str(e.value)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(CheckpointError, match=r"refused to load: the file holds objects other than weights "
                                              r"\(.*print\)"):
        load_checkpoint(path)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pkl")


def test_mismatched_weights_named(tmp_path):
    state = _small().state_dict()
    state.pop("mask_decoder.iou_token.weight")
    state["extra.weight"] = torch.zeros(1)
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bad.pth", model_type="vit_tiny256")
    msg = str(err.value)
    assert "missing keys" in msg and "iou_token" in msg
    assert "unexpected keys" in msg and "extra.weight" in msg
    assert "shape mismatches" in msg and "no_mask_embed" in msg


def test_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"a": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a SAM state dict"):
        load_checkpoint(tmp_path / "other.pt")


def test_unknown_model_type(tmp_path):
    torch.save(_small().state_dict(), tmp_path / "m.pth")
    with pytest.raises(ValueError, match="unknown model type"):
        load_checkpoint(tmp_path / "m.pth", model_type="vit_x")


def test_config_read_without_building_the_model(tmp_path):
    """read_checkpoint_config (the driver's check before a text run) gives the config that
    load_checkpoint builds, for our files, bare official files (legacy pickles too) and
    refuses the same bad files."""
    model = _small()
    save_checkpoint(model, tmp_path / "m.pt")
    assert read_checkpoint_config(tmp_path / "m.pt") == model.config
    with pytest.raises(CheckpointError, match="not 'vit_b'"):
        read_checkpoint_config(tmp_path / "m.pt", model_type="vit_b")
    state = build_official(get_config("vit_tiny256")).state_dict()
    torch.save(state, tmp_path / "zip.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # cannot be mmapped
    for name in ("zip.pth", "legacy.pth"):
        assert read_checkpoint_config(tmp_path / name) == get_config("vit_tiny256")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint_config(tmp_path / "cut.pt")
    # Weights that do not fit the named config are refused here, by shapes alone, with
    # load_checkpoint's message: the job reports it before any worker builds the model.
    with pytest.raises(CheckpointError, match="weights do not fit a 'vit_b' model: .*shape mismatches"):
        read_checkpoint_config(tmp_path / "zip.pth", model_type="vit_b")
    state.pop("mask_decoder.iou_token.weight")
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match="1 missing keys .*iou_token"):
        read_checkpoint_meta(tmp_path / "short.pth", model_type="vit_tiny256")
