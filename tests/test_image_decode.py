"""pipeline.images: every kind of hostile or unusual input decodes to the right upright RGB
pixels or is refused with its specific reason, without warnings and without global changes."""
import hashlib
import io
import pickle
import struct
import threading
import warnings
import zlib

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageFile, features
from pydantic import ValidationError

from dataset.identity import image_identity as dataset_identity
from pipeline.images import (REASONS, BadImage, ImageLimits, check_size, decode_image, image_identity, phash,
                             sniff_format)

ANY_SIZE = dict(min_side=1)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode(data: bytes, **limits) -> np.ndarray:
    """decode_image, asserting the output contract and that no warning escapes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decode_image(data, limits=ImageLimits(**limits))
    assert not caught, [str(w.message) for w in caught]
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.flags.c_contiguous and out.flags.writeable and out.flags.owndata
    return out


def reason(data: bytes, **limits) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BadImage) as info:
            decode_image(data, limits=ImageLimits(**limits))
    assert not caught, [str(w.message) for w in caught]
    e = info.value
    assert e.reason in REASONS and str(e) == f"{e.reason}: {e.detail}" and e.detail
    return e.reason


def unique_colours(h: int, w: int) -> np.ndarray:
    """Every pixel a different colour: any flip, rotation or transposition is visible."""
    k = np.arange(h * w, dtype=np.int64).reshape(h, w)
    return np.stack([(k * 7) % 256, (k * 13 + 50) % 256, (k // 3 + 9) % 256], axis=2).astype(np.uint8)


def blocks(rows: int, cols: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """An image of flat size x size blocks of distinct colours (survives JPEG) and the colours."""
    rng = np.random.default_rng(rows * 10 + cols)
    colours = rng.integers(20, 236, (rows, cols, 3)).astype(np.uint8)
    colours[0, 0] = (250, 20, 20)  # a red marker in the top-left corner
    return np.repeat(np.repeat(colours, size, 0), size, 1), colours


def block_centres(img: np.ndarray, size: int = 16) -> np.ndarray:
    return img[size // 2::size, size // 2::size].astype(int)


def _exif(orientation, **tags) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    for tag, value in tags.items():
        exif[int(tag[1:], 16)] = value
    return exif


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR declares width x height RGB, with whatever (tiny) IDAT we give it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(idat))
            + png_chunk(b"IEND", b""))


# --- limits and the exception --------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("max_bytes", 0), ("max_pixels", -1), ("min_side", 0),
                                          ("max_aspect_ratio", 0.5), ("formats", ("JPEG", "EPS")),
                                          ("formats", ()), ("alpha_background", (0, 0, 300))])
def test_bad_limits_name_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        ImageLimits(**{field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_limits_forbid_unknown_fields_and_are_frozen():
    with pytest.raises(ValidationError, match="max_pixel"):
        ImageLimits(max_pixel=10)
    limits = ImageLimits(formats=("png", "jpeg"))
    assert limits.formats == ("PNG", "JPEG")
    with pytest.raises(ValidationError):
        limits.max_bytes = 1


def test_bad_image_carries_reason_and_detail_through_pickle():
    e = BadImage("truncated", "JPEG data ends early")
    assert isinstance(e, ValueError) and str(e) == "truncated: JPEG data ends early"
    back = pickle.loads(pickle.dumps(e))  # Ray ships exceptions between processes
    assert (back.reason, back.detail, str(back)) == (e.reason, e.detail, str(e))
    with pytest.raises(ValueError, match="unknown BadImage reason"):
        BadImage("bad", "x")


# --- sizes, non-images, formats ----------------------------------------------------------------

def test_zero_byte_file():
    assert reason(b"") == "empty_file"
    with pytest.raises(BadImage, match="^empty_file"):
        check_size(0)


def test_oversize_file_is_refused_before_decoding():
    data = encode(Image.fromarray(unique_colours(40, 40)), "PNG")
    assert reason(data, max_bytes=len(data) - 1) == "too_large_file"
    assert decode(data, max_bytes=len(data)).shape == (40, 40, 3)
    with pytest.raises(BadImage, match=r"^too_large_file: 300000000 bytes > max_bytes"):
        check_size(300_000_000)  # a reader can refuse by the listed size, before reading
    check_size(256 * 2**20)


@pytest.mark.parametrize("data, kind", [
    (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML"),
    (b"  <html><head><title>Access denied</title></head></html>", "HTML"),
    (b"Hello, this is a text file named photo.jpg\n", "text"),
    (b'{"error": "NoSuchKey"}', "JSON"),
    (b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()), "signature"),
])
def test_text_html_and_garbage_are_not_images(data, kind):
    with pytest.raises(BadImage) as info:
        decode_image(data)
    assert info.value.reason == "not_an_image" and kind in info.value.detail


@pytest.mark.parametrize("head, name", [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIF"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
    (b"8BPS\x00\x01" + bytes(30), "PSD"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n", "PostScript"),
])
def test_recognised_formats_we_do_not_decode(head, name):
    with pytest.raises(BadImage) as info:
        decode_image(head + bytes(64))
    assert info.value.reason == "unsupported_format" and name in info.value.detail


def test_allowed_formats_are_per_call():
    jpg = encode(Image.fromarray(unique_colours(32, 32)), "JPEG")
    assert reason(jpg, formats=("PNG",)) == "unsupported_format"
    assert decode(jpg, formats=("JPEG",)).shape == (32, 32, 3)


# --- decompression bombs and dimensions -------------------------------------------------------

def test_bomb_png_header_is_refused_without_decoding():
    data = png_with_header(100_000, 100_000)  # 10 G pixels declared in a 60-byte file
    assert len(data) < 100
    assert reason(data) == "too_many_pixels"


def test_bomb_jpeg_header_is_refused():
    jpg = bytearray(encode(Image.fromarray(unique_colours(32, 48)), "JPEG"))
    sof = jpg.find(b"\xff\xc0")
    struct.pack_into(">HH", jpg, sof + 5, 60_000, 60_000)  # SOF0: length, precision, height, width
    assert reason(bytes(jpg)) == "too_many_pixels"


def test_pixel_limit_is_ours_per_call_and_leaves_pillow_global_alone(monkeypatch):
    before = Image.MAX_IMAGE_PIXELS
    # between our limit (100 M) and Pillow's error (2 x 89 M): Pillow only warns; we refuse, silently
    assert reason(png_with_header(12_000, 9_000)) == "too_many_pixels"
    # a real, highly compressible image over a per-call limit
    flat = encode(Image.new("RGB", (3000, 3000)), "PNG")
    assert len(flat) < 100_000
    assert reason(flat, max_pixels=1_000_000) == "too_many_pixels"
    assert decode(flat, max_pixels=9_000_000).shape == (3000, 3000, 3)
    assert Image.MAX_IMAGE_PIXELS == before
    # with Pillow's guard switched off by someone else, ours still holds
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert reason(png_with_header(100_000, 100_000)) == "too_many_pixels"


def test_pillow_bomb_warning_is_silenced_and_its_error_mapped(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    img = unique_colours(40, 40)  # 1600 px: Pillow would warn (DecompressionBombWarning)
    assert np.array_equal(decode(encode(Image.fromarray(img), "PNG")), img)
    # 2500 px > 2 x 1000: Pillow's own guard refuses, whatever our limit says
    assert reason(encode(Image.fromarray(unique_colours(50, 50)), "PNG")) == "too_many_pixels"


def test_too_small_and_1x1():
    one = encode(Image.new("RGB", (1, 1), (12, 34, 56)), "PNG")
    assert reason(one) == "too_small"  # default min_side 16: a 1 x 1 tracking pixel is not a photo
    assert decode(one, min_side=1).tolist() == [[[12, 34, 56]]]
    gif = encode(Image.new("P", (1, 1), 0), "GIF", transparency=0)
    assert reason(gif) == "too_small"
    assert decode(gif, min_side=1).tolist() == [[[255, 255, 255]]]  # transparent over white
    img = unique_colours(16, 16)
    assert np.array_equal(decode(encode(Image.fromarray(img), "PNG")), img)
    assert reason(encode(Image.fromarray(unique_colours(15, 40)), "PNG")) == "too_small"


def test_extreme_aspect_ratio():
    wide = encode(Image.fromarray(unique_colours(16, 321)), "PNG")  # 20.06
    assert reason(wide) == "extreme_aspect_ratio"
    tall = encode(Image.fromarray(unique_colours(330, 16)), "PNG")
    assert reason(tall) == "extreme_aspect_ratio"
    assert decode(encode(Image.fromarray(unique_colours(16, 320)), "PNG")).shape == (16, 320, 3)  # exactly 20
    assert decode(wide, max_aspect_ratio=21).shape == (16, 321, 3)


def test_limits_decide_in_a_fixed_order_over_random_cases():
    """Property: for random sizes and limits, the outcome is the first failing check."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        w, h = (int(v) for v in rng.integers(1, 90, 2))
        data = encode(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "PNG")
        limits = dict(max_bytes=int(rng.integers(len(data) - 50, len(data) + 50)),
                      max_pixels=int(rng.integers(1, 8000)), min_side=int(rng.integers(1, 40)),
                      max_aspect_ratio=float(rng.uniform(1, 8)))
        expected = ("too_large_file" if len(data) > limits["max_bytes"] else
                    "too_many_pixels" if w * h > limits["max_pixels"] else
                    "too_small" if min(w, h) < limits["min_side"] else
                    "extreme_aspect_ratio" if max(w, h) / min(w, h) > limits["max_aspect_ratio"] else None)
        if expected is None:
            assert decode(data, **limits).shape == (h, w, 3)
        else:
            assert reason(data, **limits) == expected, (w, h, limits)


# --- truncation -----------------------------------------------------------------------------

def _truncation_cases():
    img, _ = blocks(4, 5)
    rgb = Image.fromarray(img)
    return {
        "jpeg": encode(rgb, "JPEG", quality=90),
        "jpeg-progressive": encode(rgb, "JPEG", quality=90, progressive=True),
        # an APP1 that holds a whole small JPEG (FF D8 .. FF DA .. FF D9) in a MakerNote
        "jpeg-embedded-jpeg": encode(rgb, "JPEG", exif=_exif(1, x927C=encode(rgb.resize((20, 16)), "JPEG"))),
        "png": encode(rgb, "PNG"),
        "png-palette": encode(rgb.convert("P"), "PNG"),
        "gif": encode(rgb.convert("P"), "GIF"),
        "webp-lossless": encode(rgb, "WEBP", lossless=True),
        "webp-lossy": encode(rgb, "WEBP", quality=80),
        "tiff": encode(rgb, "TIFF"),
        "tiff-lzw": encode(rgb, "TIFF", compression="tiff_lzw"),
        "bmp": encode(rgb, "BMP"),
    }


# BMP has no end marker: with LOAD_TRUNCATED_IMAGES set by someone else, Pillow pads a cut BMP
@pytest.mark.parametrize("name, lenient_pillow", [(n, False) for n in _truncation_cases()]
                         + [(n, True) for n in _truncation_cases() if n != "bmp"])
def test_truncated_files_are_refused(name, lenient_pillow, monkeypatch):
    """Cut anywhere (including just the last byte or two): always `truncated`, even when some
    other code set Pillow's process-wide LOAD_TRUNCATED_IMAGES (which we never touch)."""
    if lenient_pillow:
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = _truncation_cases()[name]
    full = decode(data)
    assert full.shape == (64, 80, 3)
    cuts = sorted(set(range(16, len(data), max(1, len(data) // 29))) | {len(data) - 2, len(data) - 1})
    if name == "gif":  # only the first frame is decoded: a lost trailer byte (0x3B) costs nothing
        assert data[-1:] == b";" and np.array_equal(decode(data[:-1]), full)
        cuts.remove(len(data) - 1)
    got = {cut: reason(data[:cut]) for cut in cuts}
    assert set(got.values()) == {"truncated"}, {c: r for c, r in got.items() if r != "truncated"}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is lenient_pillow


def test_jpeg_with_data_after_end_marker_is_complete():
    """Motion photos and camera trailers append bytes (with FF D9 / FF DA in them) after EOI."""
    img, colours = blocks(3, 4)
    jpg = encode(Image.fromarray(img), "JPEG", quality=95)
    trailer = b"\xff\xda\x00\x08junk" + np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    out = decode(jpg + trailer)
    assert np.array_equal(out, decode(jpg))


# --- colour modes ------------------------------------------------------------------------------

def composite(rgb: np.ndarray, alpha: np.ndarray, bg=(255, 255, 255)) -> np.ndarray:
    a = alpha.astype(float)[..., None] / 255
    return np.rint(rgb.astype(float) * a + np.array(bg, float) * (1 - a)).astype(np.uint8)


@pytest.mark.parametrize("fmt, kw", [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}),
                                     ("WEBP", {"lossless": True, "exact": True})])
def test_lossless_rgb_is_exact(fmt, kw):
    img = unique_colours(24, 40)
    assert np.array_equal(decode(encode(Image.fromarray(img), fmt, **kw)), img)


@pytest.mark.parametrize("fmt, kw", [("JPEG", {"quality": 95}), ("WEBP", {"quality": 90}),
                                     pytest.param("AVIF", {"quality": 95}, marks=pytest.mark.skipif(
                                         not features.check("avif"), reason="Pillow built without AVIF"))])
def test_lossy_rgb_is_pillows_decode(fmt, kw):
    assert sniff_format(encode(Image.new("RGB", (16, 16)), fmt, **kw)) == fmt
    img, colours = blocks(3, 4)
    data = encode(Image.fromarray(img), fmt, **kw)
    out = decode(data)
    assert np.array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert np.abs(block_centres(out) - colours.astype(int)).max() <= 6


def test_grayscale_and_bilevel():
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    out = decode(encode(Image.fromarray(gray), "PNG"))
    assert all(np.array_equal(out[..., c], gray) for c in range(3))
    bits = rng.random((20, 30)) > 0.5
    out = decode(encode(Image.fromarray(bits), "PNG"))  # mode "1"
    assert np.array_equal(out, np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, 2))
    out = decode(encode(Image.fromarray(bits), "TIFF", compression="group4"))
    assert np.array_equal(out[..., 0], np.where(bits, 255, 0))


def test_rgba_and_la_composite_over_white_or_chosen_background():
    rng = np.random.default_rng(3)
    rgb = unique_colours(20, 30)
    alpha = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    alpha[0, :3] = (0, 128, 255)
    data = encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG")
    out = decode(data)
    assert np.array_equal(out, composite(rgb, alpha))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 2].tolist() == rgb[0, 2].tolist()
    assert np.array_equal(decode(data, alpha_background=(0, 0, 0)), composite(rgb, alpha, (0, 0, 0)))
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    la = Image.fromarray(np.dstack([gray, alpha]), "LA")
    out = decode(encode(la, "PNG"))
    assert np.array_equal(out, composite(np.repeat(gray[..., None], 3, 2), alpha))
    # WebP with alpha
    out = decode(encode(Image.fromarray(np.dstack([rgb, alpha])), "WEBP", lossless=True, exact=True))
    assert np.array_equal(out, composite(rgb, alpha))


def test_palette_with_and_without_transparency():
    index = np.random.default_rng(4).integers(0, 3, (20, 30), dtype=np.uint8)
    palette = [200, 10, 10, 10, 200, 10, 10, 10, 200]
    im = Image.fromarray(index, "P")
    im.putpalette(palette)
    colours = np.array(palette, np.uint8).reshape(3, 3)
    assert np.array_equal(decode(encode(im, "PNG")), colours[index])
    transparent = colours[index].copy()
    transparent[index == 1] = 255  # index 1 transparent: white
    assert np.array_equal(decode(encode(im, "PNG", transparency=1)), transparent)
    assert np.array_equal(decode(encode(im, "GIF", transparency=1)), transparent)
    # partial alpha per palette entry (tRNS with several values)
    out = decode(encode(im, "PNG", transparency=bytes([255, 0, 128])))
    expected = composite(colours[index], np.array([255, 0, 128], np.uint8)[index])
    assert np.array_equal(out, expected)


def test_cmyk_jpeg():
    cmyk = np.zeros((32, 80, 4), np.uint8)
    inks = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]
    for i, ink in enumerate(inks):
        cmyk[:, 16 * i:16 * (i + 1)] = ink
    data = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode(data)
    expected = [(255, 255, 255), (0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)]
    assert np.abs(out[16, 8::16].astype(int) - np.array(expected)).max() <= 4
    # also a CMYK TIFF (lossless): exact, with a mixed ink R = (255 - C)(255 - K) / 255
    cmyk[:, :16] = (128, 0, 64, 128)
    expected[0] = (63, 127, 95)
    out = decode(encode(Image.fromarray(cmyk, "CMYK"), "TIFF"))
    assert out[16, 8::16].tolist() == [list(c) for c in expected]


def test_16_bit_grayscale_is_scaled_not_clipped():
    values = np.array([0, 1, 128, 129, 257, 1000, 30000, 32896, 65279, 65534, 65535], np.uint16)
    img = np.tile(values, (16, 2))
    for data in (encode(Image.fromarray(img), "PNG"), encode(Image.fromarray(img), "TIFF"),
                 encode(Image.frombytes("I;16B", img.shape[::-1], img.astype(">u2").tobytes()), "TIFF")):
        out = decode(data, max_aspect_ratio=2)
        expected = np.rint(values / 257).astype(np.uint8)  # 257 * k -> k exactly
        assert out[0, :11, 0].tolist() == expected.tolist() == [0, 0, 0, 1, 1, 4, 117, 128, 254, 255, 255]
        assert np.array_equal(out[..., 0], out[..., 2])


def png16(samples: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): rows of big-endian samples."""
    h, w, _ = samples.shape
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("colour_type, channels", [(2, 3), (6, 4), (4, 2)])
def test_16_bit_colour_and_alpha_pngs_keep_the_high_byte(colour_type, channels):
    """Pillow reads 16-bit RGB, RGBA and gray+alpha PNGs as 8 bit by keeping the high byte
    (v // 256): never clipped, at most 1 below the rounded v / 257 of 16-bit grayscale."""
    values = np.array([0, 255, 256, 384, 385, 30000, 32896, 65535] * 2, np.uint16)
    samples = np.zeros((16, 16, channels), np.uint16)
    samples[..., 0] = values
    if channels in (2, 4):
        samples[..., -1] = 65535  # opaque
    out = decode(png16(samples, colour_type))
    assert out[0, :8, 0].tolist() == (values[:8] // 256).tolist() == [0, 0, 1, 1, 1, 117, 128, 255]
    assert np.abs(out[0, :, 0].astype(int) - np.rint(values / 257)).max() <= 1
    assert np.array_equal(decode(png16(samples[..., :1], 0))[0, :8, 0], np.rint(values[:8] / 257))


def test_32_bit_int_and_float_tiffs():
    ints = np.tile(np.array([0, 257, 65535, 1000], np.int32), (16, 4))
    assert decode(encode(Image.fromarray(ints, "I"), "TIFF"))[0, :4, 0].tolist() == [0, 1, 255, 4]
    signed = np.tile(np.array([-100, 0, 100], np.int32), (16, 6))  # outside 0..65535: min..max stretch
    assert decode(encode(Image.fromarray(signed, "I"), "TIFF"))[0, :3, 1].tolist() == [0, 128, 255]
    unit = np.tile(np.array([0.0, 0.5, 1.0, 0.25], np.float32), (16, 4))
    out = decode(encode(Image.fromarray(unit, "F"), "TIFF"))
    assert out[0, :4, 2].tolist() == [0, 128, 255, 64]
    wide = np.tile(np.array([-1.0, 1.0, 3.0, np.nan], np.float32), (16, 4))  # NaN -> 0, then stretch
    assert decode(encode(Image.fromarray(wide, "F"), "TIFF"))[0, :4, 0].tolist() == [0, 128, 255, 64]


# --- frames ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, kw", [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {}),
                                     ("MPO", {"quality": 95})])
def test_multi_frame_gives_the_first_frame(fmt, kw):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    frames = [Image.new("RGB", (24, 20), c) for c in colours]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    reopened = Image.open(io.BytesIO(data))
    assert getattr(reopened, "n_frames", 1) == 3
    out = decode(data)
    assert out.shape == (20, 24, 3) and np.abs(out.astype(int) - colours[0]).max() <= 2


# --- EXIF orientation --------------------------------------------------------------------------

def stored_for(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for `upright` under each EXIF orientation, from the spec's
    words for where the stored row 0 and column 0 belong in the upright picture."""
    u = upright
    return {
        1: u,                                   # row 0 top,    column 0 left
        2: u[:, ::-1],                          # row 0 top,    column 0 right
        3: u[::-1, ::-1],                       # row 0 bottom, column 0 right
        4: u[::-1, :],                          # row 0 bottom, column 0 left
        5: u.transpose(1, 0, 2),                # row 0 left,   column 0 top
        6: u.transpose(1, 0, 2)[::-1, :],       # row 0 right,  column 0 top
        7: u.transpose(1, 0, 2)[::-1, ::-1],    # row 0 right,  column 0 bottom
        8: u.transpose(1, 0, 2)[:, ::-1],       # row 0 left,   column 0 bottom
    }[orientation]


def test_stored_for_matches_the_spec_on_a_corner_marker():
    """The helper itself, against the spec's wording for 6 and 8."""
    u = unique_colours(3, 5)
    s6 = stored_for(u, 6)
    assert s6.shape == (5, 3, 3)
    # 6: row 0 of the stored image is the right column of the upright, read top to bottom
    assert np.array_equal(s6[0], u[:, -1]) and np.array_equal(s6[:, 0], u[0, ::-1])
    # 8: row 0 is the left column read bottom to top, column 0 the bottom row
    s8 = stored_for(u, 8)
    assert np.array_equal(s8[0], u[::-1, 0]) and np.array_equal(s8[:, 0], u[-1, :])


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_exif_orientation_lossless_exact(orientation, fmt):
    upright = unique_colours(18, 30)
    kw = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    data = encode(Image.fromarray(np.ascontiguousarray(stored_for(upright, orientation))), fmt,
                  exif=_exif(orientation), **kw)
    assert np.array_equal(decode(data), upright)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg_marker(orientation):
    upright, colours = blocks(3, 5)  # red marker block at the upright top-left
    stored = np.ascontiguousarray(stored_for(upright, orientation))
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=_exif(orientation))
    out = decode(data)
    assert out.shape == upright.shape
    assert np.abs(block_centres(out) - colours.astype(int)).max() <= 6
    assert out[8, 8].tolist()[0] > 200 and out[8, 8].tolist()[1] < 60  # the marker, top-left


def test_exif_orientation_changes_phash_to_the_upright_ones():
    upright, _ = blocks(4, 6)
    plain = encode(Image.fromarray(upright), "JPEG", quality=95)
    rotated = encode(Image.fromarray(np.ascontiguousarray(stored_for(upright, 6))), "JPEG", quality=95,
                     exif=_exif(6))
    assert imagehash.hex_to_hash(phash(decode(plain))) - imagehash.hex_to_hash(phash(decode(rotated))) <= 4


def _jpeg_with_raw_exif(img: np.ndarray, payload: bytes) -> bytes:
    """A JPEG whose APP1 holds exactly `payload` after "Exif\\0\\0" (Pillow writes it verbatim)."""
    return encode(Image.fromarray(img), "JPEG", quality=95, exif=b"Exif\x00\x00" + payload)


@pytest.mark.parametrize("payload", [
    b"II*\x00\xff\xff\xff\x7f",                          # IFD offset far past the end
    b"II*\x00\x08\x00\x00\x00\xff\xff" + bytes(20),      # 65535 entries declared, 20 bytes present
    b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x09\x00\x00",  # orientation 9
    b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x02\x00\x00\x00\x02A\x00\x00\x00",     # orientation "A"
    b"garbage that is not TIFF at all",
    b"",
])
def test_corrupt_exif_still_decodes_upright_as_stored(payload):
    img, colours = blocks(3, 4)
    data = _jpeg_with_raw_exif(img, payload)
    out = decode(data)
    assert np.array_equal(out, decode(encode(Image.fromarray(img), "JPEG", quality=95)))


# --- never a crash, never a global change ------------------------------------------------------

def test_mutated_files_decode_or_raise_bad_image_only():
    """Seeded fuzz: flipped bytes and cuts in real files give an image or a BadImage, never
    another exception, and never a warning."""
    rng = np.random.default_rng(11)
    img, _ = blocks(2, 3)
    seeds = [encode(Image.fromarray(img), "JPEG"), encode(Image.fromarray(img), "PNG"),
             encode(Image.fromarray(img).convert("P"), "GIF"), encode(Image.fromarray(img), "WEBP"),
             encode(Image.fromarray(img), "TIFF"), encode(Image.fromarray(img), "BMP")]
    outcomes = set()
    for k in range(240):
        data = bytearray(seeds[k % len(seeds)])
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = decode_image(bytes(data), limits=ImageLimits(**ANY_SIZE))
                assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
                outcomes.add("ok")
            except BadImage as e:
                outcomes.add(e.reason)
        assert not caught, [str(w.message) for w in caught]
    assert "ok" in outcomes and len(outcomes) >= 3, outcomes


def test_concurrent_decodes_from_threads_leave_warning_filters_as_they_were():
    filters = list(warnings.filters)
    img = unique_colours(32, 48)
    good = encode(Image.fromarray(img), "PNG")
    bad = encode(Image.fromarray(img), "JPEG")[:-300]
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(np.array_equal(decode_image(good), img))
                try:
                    decode_image(bad)
                except BadImage as e:
                    results.append(e.reason == "truncated")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 160 and all(results)
    assert warnings.filters == filters


def test_png_metadata_bomb_is_refused_quickly():
    """50 MB of zeros compressed into a zTXt chunk: Pillow's text limit stops it (decode_error)."""
    import tracemalloc
    good = encode(Image.fromarray(unique_colours(20, 20)), "PNG")
    bomb = good[:33] + png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(bytes(50_000_000), 9)) + good[33:]
    assert len(bomb) < 300_000
    tracemalloc.start()
    try:
        with pytest.raises(BadImage) as info:
            decode_image(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == "decode_error" and "too large" in info.value.detail
    assert peak < 50e6


def test_bytes_like_inputs():
    img = unique_colours(20, 20)
    data = encode(Image.fromarray(img), "PNG")
    for view in (bytearray(data), memoryview(data)):
        assert np.array_equal(decode_image(view), img)


def test_sniffing_picks_the_one_plugin():
    img = Image.fromarray(unique_colours(20, 20))
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"):
        assert sniff_format(encode(img, fmt)) == fmt
    assert sniff_format(encode(img, "PPM")) is None


# --- identity and phash ------------------------------------------------------------------------

def test_image_identity_is_sha256_of_the_bytes():
    data = encode(Image.fromarray(unique_colours(20, 20)), "PNG")
    assert image_identity(data) == hashlib.sha256(data).hexdigest() == dataset_identity(data)[0]


def test_phash_is_the_dataset_ones_and_imagehash_of_the_file():
    """One phash: the pipeline's (decoded array) equals dataset.identity's and, for upright
    RGB or grayscale files, plain imagehash.phash of the opened file (what was stored before)."""
    rng = np.random.default_rng(5)
    img, _ = blocks(4, 6)
    gray = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    for data in (encode(Image.fromarray(img), "JPEG"), encode(Image.fromarray(img), "PNG"),
                 encode(Image.fromarray(gray), "PNG"), encode(Image.fromarray(gray), "JPEG")):
        ours = phash(decode(data))
        assert ours == dataset_identity(data)[1] == str(imagehash.phash(Image.open(io.BytesIO(data))))
        assert len(ours) == 16 and int(ours, 16) >= 0
    assert dataset_identity(b"<html></html>")[1] is None
    tiny = encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")  # the dataset hashes any decodable size
    assert dataset_identity(tiny)[1] == phash(decode(tiny, min_side=1))
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        phash(np.zeros((4, 4), np.uint8))


def test_module_is_ray_free():
    """The decode step runs inside Ray tasks but must not need Ray (nor the dataset's Delta stack)."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, pipeline.images as m; m.decode_image; "
            "print(sorted(k for k in ('ray', 'deltalake', 'torch') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
