"""Read, decode and validate one input image: bytes -> H x W x 3 uint8 RGB, upright.

Plain Python, numpy and Pillow (no Ray): the pipeline's reader tasks call `decode_image`
on each file's bytes, and a `BadImage` becomes a quarantine record with its reason.

Order of the checks (cheapest first, nothing is decoded before the header passed):

1. size of the bytes: `empty_file`, `too_large_file` (`check_size` lets a reader refuse an
   object from its listed size before reading it);
2. the signature (magic bytes) picks the one Pillow plugin allowed to parse the file:
   only the formats in `ImageLimits.formats` ever reach Pillow (no EPS/Ghostscript, no
   exotic parsers); anything else is `not_an_image` (text, HTML, random bytes) or
   `unsupported_format` (a recognised image format we do not decode: HEIC, PSD, ...);
3. structure, walked without decoding: a JPEG without its end-of-image marker (bytes after
   it, like a motion photo's video, are fine), a PNG without IEND, a WebP shorter than its
   RIFF size, a GIF whose first image's blocks are cut (a lost trailer alone is fine), a TIFF
   whose first IFD, tag values or strips lie past the end, a BMP cut inside its headers are
   `truncated`, whether or not Pillow could decode part of them and whatever the process-wide
   `ImageFile.LOAD_TRUNCATED_IMAGES` says (never changed here; a BMP cut in its pixels is
   caught by Pillow only while that global is False);
4. the header's dimensions: `too_many_pixels` (the decompression-bomb guard, per call),
   `too_small` (default min_side 16: a 1 x 1 tracking pixel or an icon is not a photo to
   segment; min_side=1 decodes it), `extreme_aspect_ratio` (default 20: at 1024 px on the
   long side the short one keeps >= 51 px);
5. the pixel decode of the first frame: errors are `truncated` or `decode_error`;
6. conversion to RGB (`unsupported_mode` if there is none) and the EXIF orientation.

Conversions:

- 1, L, P, RGB, RGBX, YCbCr, CMYK: Pillow's conversion to RGB. CMYK is the plain formula
  R = (255 - C)(255 - K) / 255 (Adobe-inverted JPEGs are handled by Pillow's JPEG reader); an
  embedded ICC profile is not applied, for any mode (as OpenCV and the official SAM scripts
  read images).
- Anything with alpha (RGBA, LA, PA, RGBa, La, or P/L/RGB with a transparency key) is
  composited over `ImageLimits.alpha_background` (white by default, like a page behind a
  cut-out): the colour under a fully transparent pixel is often garbage.
- 16-bit grayscale (I;16, I;16B, ...) is scaled to 8 bit with rounding (v / 257), not
  clipped; "I" (32-bit int) likewise when its values lie in 0..65535, else stretched from its
  min..max; "F" (32-bit float) is scaled by 255 when its values lie in 0..1, else stretched
  from min..max (NaN/inf become 0). Pillow itself reads 16-bit RGB, RGBA and gray+alpha PNGs
  as 8-bit by keeping the high byte (v // 256, at most 1 below v / 257 rounded).
- Multi-frame files (GIF, APNG, TIFF pages, animated WebP, MPO) give their first frame.
- EXIF orientation 2..8 is applied; an unreadable or corrupt EXIF block is ignored (the image
  still decodes, as orientation 1).

Pillow's own decompression-bomb check (the process-wide `Image.MAX_IMAGE_PIXELS`) is never
changed: its warning is silenced during the call (our `max_pixels` check replaces it) and its
error becomes `too_many_pixels`. So a `max_pixels` above 2 x `Image.MAX_IMAGE_PIXELS` is capped
by Pillow's guard unless the process raises that global itself. Silencing uses
`warnings.catch_warnings`, process-wide state on Python < 3.14, so decodes in one process are
serialised by a lock (Ray runs reader tasks in separate processes: no cost there).

Every other exception Pillow raises on hostile bytes becomes `decode_error` (or `truncated`
when it says so); only MemoryError passes through (a worker's problem, not the file's).
"""
from __future__ import annotations

import io
import threading
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

REASONS = frozenset({
    "empty_file", "too_large_file", "not_an_image", "unsupported_format", "truncated",
    "too_many_pixels", "too_small", "extreme_aspect_ratio", "unsupported_mode", "decode_error",
})

# The formats we decode; each is parsed only by its own Pillow plugin (JPEG's also reads MPO).
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "AVIF")


class ImageLimits(BaseModel):
    """What `decode_image` accepts. A bad value raises a ValidationError naming its field."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(256 * 2**20, gt=0, description="largest file, in bytes")
    max_pixels: int = Field(100_000_000, gt=0,
                            description="largest width x height, checked from the header before decoding")
    min_side: int = Field(16, ge=1, description="smallest width or height (a 1 x 1 tracking pixel is too_small)")
    max_aspect_ratio: float = Field(20.0, ge=1.0, description="largest long side / short side")
    formats: tuple[str, ...] = Field(SUPPORTED_FORMATS, min_length=1, description="formats to decode")
    alpha_background: tuple[int, int, int] = Field((255, 255, 255), description="RGB under transparent pixels")

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        v = tuple(f.upper() for f in v)
        unknown = [f for f in v if f not in SUPPORTED_FORMATS]
        if unknown:
            raise ValueError(f"unknown format(s) {unknown}; supported: {list(SUPPORTED_FORMATS)}")
        return v

    @field_validator("alpha_background")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= c <= 255 for c in v):
            raise ValueError("each channel must be in 0..255")
        return v


class BadImage(ValueError):
    """An input that cannot become an RGB image: `reason` is a short code from REASONS,
    `detail` says what exactly. str(e) == f"{reason}: {detail}"."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown BadImage reason {reason!r}")
        super().__init__(reason, detail)  # args keep the exception picklable (Ray)
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def image_identity(data: bytes) -> str:
    """The image_id: sha256 hex of the file's bytes (dataset.identity's, the one definition)."""
    from dataset.identity import sha256_hex  # imported on use: the dataset package loads deltalake

    return sha256_hex(data)


def phash(rgb: np.ndarray) -> str:
    """Perceptual hash (imagehash.phash, hex) of a decoded H x W x 3 uint8 image (dataset.identity's)."""
    from dataset.identity import phash_rgb

    return phash_rgb(rgb)


def check_size(nbytes: int, limits: ImageLimits = ImageLimits()) -> None:
    """Refuse a file by its size alone (before reading it): empty_file / too_large_file."""
    if nbytes <= 0:
        raise BadImage("empty_file", "the file has 0 bytes")
    if nbytes > limits.max_bytes:
        raise BadImage("too_large_file", f"{nbytes} bytes > max_bytes {limits.max_bytes}")


# --- signatures ------------------------------------------------------------------------

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_BMP_HEADERS = (12, 16, 40, 52, 56, 64, 108, 124)  # DIB header sizes
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")


def _iso_brands(data: bytes) -> list[bytes]:
    """Major and compatible brands of an ISO-BMFF file's leading ftyp box, or []."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return []
    end = min(int.from_bytes(data[:4], "big"), len(data), 4096)
    return [data[i:i + 4] for i in range(8, end - 3, 4) if i != 12]  # skip minor_version


def sniff_format(data: bytes) -> str | None:
    """The format of `data` by its signature: one of SUPPORTED_FORMATS, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == _PNG_SIG:
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:2] == b"BM" and (len(data) < 18 or int.from_bytes(data[14:18], "little") in _BMP_HEADERS):
        return "BMP"
    brands = _iso_brands(data)
    if b"avif" in brands or b"avis" in brands:
        return "AVIF"
    return None


def _other_format(data: bytes) -> str | None:
    """A recognised format that we do not decode (for a clearer quarantine reason)."""
    if any(b in _iso_brands(data) for b in _HEIF_BRANDS):
        return "HEIF/HEIC"
    for sig, name in ((b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"),
                      (b"8BPS", "PSD"), (b"%PDF", "PDF"), (b"%!PS", "PostScript"),
                      (b"\xc5\xd0\xd3\xc6", "EPS"), (b"qoif", "QOI"), (b"\x00\x00\x01\x00", "ICO"),
                      (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"P6", "PPM")):
        if data.startswith(sig):
            return name
    return None


def _describe_non_image(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        kind = "an HTML document"
    elif head.startswith(b"<?xml") or head.startswith(b"<svg"):
        kind = "an XML/SVG document"
    elif head[:1] in (b"{", b"["):
        kind = "JSON text"
    else:
        try:
            data[:512].decode("utf-8")
            kind = "text"
        except UnicodeDecodeError:
            kind = "no known image signature"
    return f"{kind} (starts with {data[:16]!r})"


# --- structural truncation checks --------------------------------------------------------

def _jpeg_complete(data: bytes) -> bool:
    """Whether the JPEG stream starting at 0 reaches its end-of-image marker.

    Walks the segments by their lengths (so an EXIF thumbnail inside APP1 is skipped) and the
    entropy-coded data after each SOS (where 0xFF is always followed by 0x00 or an RST marker);
    anything after EOI (a motion-photo video, a trailer) is ignored."""
    n, pos = len(data), 2
    while True:
        ff = data.find(b"\xff", pos)  # extraneous bytes before a marker are tolerated, as by libjpeg
        if ff < 0:
            return False
        pos = ff + 1
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return False
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return True
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD8:
            continue  # stuffed byte, TEM, RSTn, stray SOI: no length
        if pos + 2 > n:
            return False
        pos += int.from_bytes(data[pos:pos + 2], "big")
        if pos > n:
            return False
        # after SOS the entropy-coded data follows: the next FF-marker search handles it,
        # since stuffed FF00 and RSTn are skipped above


def _png_complete(data: bytes) -> bool:
    """Whether the PNG's chunks, walked by their lengths, reach IEND within the bytes."""
    n, pos = len(data), 8
    while pos + 8 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        pos += 12 + length
        if pos > n:
            return False
        if kind == b"IEND":
            return True
    return False


def _webp_complete(data: bytes) -> bool:
    return len(data) >= 8 + int.from_bytes(data[4:8], "little")


def _gif_complete(data: bytes) -> bool:
    """Whether the GIF's blocks, walked up to the end of the first image, are all present
    (only the first frame is decoded; a missing trailer after it is tolerated, as by browsers)."""
    n = len(data)
    if n < 13:
        return False
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # global colour table
    while pos < n:
        block = data[pos]
        if block == 0x3B:  # trailer before any image: nothing to decode, let Pillow say so
            return True
        if block == 0x21:  # extension: label, then sub-blocks
            pos += 2
        elif block == 0x2C:  # image descriptor, local colour table, LZW code size, sub-blocks
            if pos + 10 > n:
                return False
            flags = data[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
        else:
            return True  # not a block we know: Pillow decides
        while pos < n and data[pos]:  # sub-blocks up to the zero-length terminator
            pos += data[pos] + 1
        if pos >= n:
            return False
        pos += 1
        if block == 0x2C:
            return True
    return False


def _tiff_complete(data: bytes) -> bool:
    """Whether the first IFD and the strips or tiles it points to lie within the bytes
    (classic TIFF; BigTIFF is left to Pillow)."""
    order = "little" if data[:2] == b"II" else "big"
    if int.from_bytes(data[2:4], order) != 42:
        return True
    n = len(data)
    if n < 8:
        return False
    ifd = int.from_bytes(data[4:8], order)
    if ifd + 2 > n:
        return False
    count = int.from_bytes(data[ifd:ifd + 2], order)
    if ifd + 2 + 12 * count + 4 > n:
        return False
    sizes = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
    values: dict[int, np.ndarray] = {}
    for k in range(count):
        e = ifd + 2 + 12 * k
        tag, typ, num = (int.from_bytes(data[e:e + 2], order), int.from_bytes(data[e + 2:e + 4], order),
                         int.from_bytes(data[e + 4:e + 8], order))
        if typ not in sizes:
            continue
        size = sizes[typ]
        at = e + 8 if size * num <= 4 else int.from_bytes(data[e + 8:e + 12], order)
        if at + size * num > n:  # a value stored past the end
            return False
        if tag in (273, 279, 324, 325) and typ in (3, 4, 16):  # strip/tile offsets and byte counts
            dtype = np.dtype(f"{'<' if order == 'little' else '>'}u{size}")
            values[tag] = np.frombuffer(data, dtype, count=num, offset=at).astype(np.uint64)
    for offsets, counts in ((273, 279), (324, 325)):
        if offsets in values and counts in values:
            m = min(len(values[offsets]), len(values[counts]))
            if m and int((values[offsets][:m] + values[counts][:m]).max()) > n:
                return False
    return True


def _bmp_complete(data: bytes) -> bool:
    """Whether the BMP's headers and the start of its pixels lie within the bytes (the rest is
    Pillow's check: the file-size field is unreliable)."""
    n = len(data)
    if n < 18 or n < 14 + int.from_bytes(data[14:18], "little"):
        return False
    return int.from_bytes(data[10:14], "little") < n


_COMPLETE = {"BMP": _bmp_complete, "JPEG": _jpeg_complete, "PNG": _png_complete, "WEBP": _webp_complete,
             "GIF": _gif_complete, "TIFF": _tiff_complete}

_TRUNCATION_WORDS = ("truncated", "premature end", "unexpected end", "end of file", "not enough data",
                     "buffer is not large enough", "read past end")

# --- decoding ------------------------------------------------------------------------------

# warnings.catch_warnings changes process-wide state (Python < 3.14): one decode at a time
# inside that window keeps a thread's exit from restoring another thread's filters.
_WARNINGS_LOCK = threading.RLock()


class _quiet:
    """Silence Pillow's warnings (decompression bomb, corrupt EXIF, palette transparency)
    during a decode: each is replaced by one of our checks or is harmless."""

    def __enter__(self):
        _WARNINGS_LOCK.acquire()
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
        warnings.filterwarnings("ignore", module=r"pipeline\.images$")

    def __exit__(self, *exc):
        try:
            self._cm.__exit__(*exc)
        finally:
            _WARNINGS_LOCK.release()
        return False


def decode_image(data: bytes, *, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """bytes -> H x W x 3 uint8 RGB (C-contiguous, owned), EXIF orientation applied.

    Raises BadImage (reason in REASONS) for anything that is not a valid image within limits.
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    check_size(len(data), limits)
    fmt = sniff_format(data)
    if fmt is None:
        other = _other_format(data)
        if other:
            raise BadImage("unsupported_format", f"{other} is not decoded (supported: {', '.join(limits.formats)})")
        raise BadImage("not_an_image", _describe_non_image(data))
    if fmt not in limits.formats:
        raise BadImage("unsupported_format", f"{fmt} is not in the allowed formats {list(limits.formats)}")
    complete = _COMPLETE.get(fmt)
    if complete is not None and not complete(data):
        raise BadImage("truncated", f"{fmt} data ends before its end marker ({len(data)} bytes)")
    try:
        with _quiet():
            return _decode(data, fmt, limits)
    except BadImage:
        raise
    except MemoryError:
        raise  # a resource problem of this worker, not a property of the file
    except Exception as e:  # Pillow raises many kinds on hostile input; all mean "cannot decode"
        if isinstance(e, Image.DecompressionBombError):
            raise BadImage("too_many_pixels", f"{e} (Pillow's Image.MAX_IMAGE_PIXELS)") from None
        message = f"{type(e).__name__}: {e}"[:300]
        if any(w in str(e).lower() for w in _TRUNCATION_WORDS):
            raise BadImage("truncated", f"{fmt}: {message}") from None
        raise BadImage("decode_error", f"{fmt}: {message}") from None


def _decode(data: bytes, fmt: str, limits: ImageLimits) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:
        raise BadImage("too_many_pixels", f"{e} (Pillow's Image.MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:
        raise BadImage("decode_error", f"{fmt} signature but Pillow cannot parse its header") from None
    with im:
        _check_dimensions(*im.size, limits)
        im.seek(0)
        im.load()
        orientation = _orientation(im)
        rgb = _to_rgb(im, limits.alpha_background)
    rgb = _orient(rgb, orientation)
    # np.asarray of a PIL image is a read-only view of its bytes: hand out an owned,
    # writeable, C-contiguous uint8 array (copied only when it is not one already)
    return np.require(rgb, np.uint8, ["C_CONTIGUOUS", "WRITEABLE", "OWNDATA"])


def _check_dimensions(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise BadImage("too_many_pixels",
                       f"{width} x {height} = {width * height} pixels > max_pixels {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise BadImage("too_small", f"{width} x {height}: a side is below min_side {limits.min_side}")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise BadImage("extreme_aspect_ratio",
                       f"{width} x {height}: aspect ratio {ratio:.1f} > max_aspect_ratio {limits.max_aspect_ratio:g}")


def _orientation(im) -> int:
    """EXIF orientation 1..8; 1 when absent, out of range or unreadable (corrupt EXIF)."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # corrupt EXIF must not cost the image
        return 1
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation: stored pixels -> upright (views; copied once by the caller)."""
    if orientation in (5, 6, 7, 8):
        # 5: stored row 0 is the left column (transpose); 6: needs 90 deg clockwise;
        # 7: transverse; 8: needs 90 deg counter-clockwise
        rgb = {5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
               7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: np.rot90(a, 1)}[orientation](rgb)
    elif orientation == 2:
        rgb = rgb[:, ::-1]
    elif orientation == 3:
        rgb = rgb[::-1, ::-1]
    elif orientation == 4:
        rgb = rgb[::-1]
    return rgb


_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _to_rgb(im, background: tuple[int, int, int]) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16"):
        return _gray_to_rgb(_scale_uint16(np.asarray(im)))
    if mode == "I":
        return _gray_to_rgb(_scale_int32(np.asarray(im)))
    if mode == "F":
        return _gray_to_rgb(_scale_float(np.asarray(im)))
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info):
        try:
            rgba = np.asarray(im.convert("RGBA"))
        except ValueError as e:
            raise BadImage("unsupported_mode", f"{mode}: {e}") from None
        return _composite(rgba, background)
    if mode == "RGB":
        return np.asarray(im)
    try:
        return np.asarray(im.convert("RGB"))
    except ValueError as e:  # e.g. LAB, HSV without a conversion
        raise BadImage("unsupported_mode", f"{mode}: {e}") from None


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _scale_uint16(a: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded (v / 257: 257 * k maps to k exactly)."""
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _stretch(a: np.ndarray) -> np.ndarray:
    """min..max -> 0..255 (float64 input, finite); a constant image becomes 0."""
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.floor((a - lo) * 255.0 / (hi - lo) + 0.5).astype(np.uint8)  # round half up


def _scale_int32(a: np.ndarray) -> np.ndarray:
    if a.size and a.min() >= 0 and a.max() <= 65535:
        return _scale_uint16(a)
    return _stretch(a.astype(np.float64))


def _scale_float(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    a = np.where(finite, a, 0.0)
    if not a.size or (a.min() >= 0.0 and a.max() <= 1.0):
        return np.floor(a * 255.0 + 0.5).astype(np.uint8)
    return _stretch(a)


def _composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Alpha-composite over a flat background, rounded: rgb * a + bg * (1 - a)."""
    alpha = rgba[:, :, 3:4].astype(np.uint32)
    rgb = rgba[:, :, :3].astype(np.uint32)
    bg = np.asarray(background, np.uint32)
    return ((rgb * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)
