"""The images a service annotates: listed once at start, read and decoded on demand with the
pipeline's own reader and decoder, so an image annotated here has the same image_id
(sha256 of its bytes), orientation and pixels as when the automatic pipeline annotates it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from dataset.identity import phash_rgb, sha256_hex
from pipeline.images import ImageLimits, decode_image
from pipeline.sources import InputError, list_inputs, read_bytes

# Any image the decoder can read may be annotated by hand; the pipeline's size limits are its own.
LIMITS = ImageLimits(min_side=1, max_aspect_ratio=float("inf"))


@dataclass
class LoadedImage:
    index: int
    uri: str
    image_id: str
    rgb: np.ndarray  # H x W x 3 uint8, upright

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


class ImageCatalog:
    def __init__(self, uris: list[str], *, max_bytes: int, endpoint_url: str | None = None):
        self.uris = list(uris)
        self.max_bytes = max_bytes
        self.endpoint_url = endpoint_url
        self._ids: dict[int, str] = {}  # index -> image_id as last read here

    @classmethod
    def of(cls, config) -> "ImageCatalog":
        """The images of a service's EngineConfig (its images spec, or its images_from
        dataset). InputError when they cannot be listed or there are none: the list is made
        once, at start, so that an index names the same image on every replica, and a
        service with nothing to show is a wrong path or one started before its images."""
        from dataset import DataFileMissing, DatasetNotFound

        reading = {"max_bytes": config.max_image_bytes, "endpoint_url": config.endpoint_url}
        if config.images is not None:
            return cls.from_spec(config.images, **reading)
        try:
            catalog = cls.from_dataset(config.images_from, run_id=config.prefill_run_id, **reading)
        except (DatasetNotFound, DataFileMissing) as e:
            raise InputError(str(e)) from None
        if not len(catalog):
            raise InputError(f"dataset {config.images_from!r} lists no images")
        return catalog

    @classmethod
    def from_spec(cls, spec: str, *, max_bytes: int, endpoint_url: str | None = None) -> "ImageCatalog":
        """The images an input spec names (folder, file, glob, s3:// prefix, manifest)."""
        return cls(list_inputs(spec, endpoint_url)["uri"].to_pylist(), max_bytes=max_bytes, endpoint_url=endpoint_url)

    @classmethod
    def from_dataset(cls, root: str, *, run_id: str | None = None, max_bytes: int,
                     endpoint_url: str | None = None) -> "ImageCatalog":
        """The images of a dataset version (its latest, or the last of run_id), by uri."""
        from dataset import read_images, storage_options

        table = read_images(root, columns=["uri"], run_id=run_id, options=storage_options(root, endpoint_url))
        return cls(sorted(set(table["uri"].to_pylist())), max_bytes=max_bytes, endpoint_url=endpoint_url)

    def __len__(self) -> int:
        return len(self.uris)

    def load(self, index: int) -> LoadedImage:
        if not 0 <= index < len(self.uris):
            raise IndexError(f"image index {index} out of range (0..{len(self.uris) - 1})")
        uri = self.uris[index]
        data = read_bytes(uri, max_bytes=self.max_bytes, endpoint_url=self.endpoint_url)
        image = LoadedImage(index, uri, sha256_hex(data), decode_image(data, limits=LIMITS))
        self._ids[index] = image.image_id
        return image

    def load_checked(self, index: int, image_id: str) -> LoadedImage:
        """Image `index`, which must still be the image_id the client opened."""
        image = self.load(index)
        if image.image_id != image_id:
            raise KeyError(f"image {index} ({image.uri}) is not {image_id[:16]}...: changed on disk?")
        return image

    def check(self, index: int, image_id: str) -> LoadedImage | None:
        """Raise as load_checked does unless image `index` is image_id. Reads the file only
        when this catalog last read it as another image or never (and returns the image),
        so a click on a cached embedding costs no read."""
        if self._ids.get(index) == image_id:
            return None
        return self.load_checked(index, image_id)


def phash(image: LoadedImage) -> str:
    return phash_rgb(image.rgb)


def committed(root: str, image_id: str, endpoint_url: str | None = None) -> bool:
    """Whether the dataset at root holds image_id (one row per image)."""
    from dataset import open_dataset, storage_options

    try:
        ds = open_dataset(root, options=storage_options(root, endpoint_url))
    except Exception:  # no table yet
        return False
    return ds.count_rows(filter=pc.field("image_id") == image_id) > 0
