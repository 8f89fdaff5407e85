"""Label Studio's brush RLE, both ways, and its conversion to and from COCO RLE.

Label Studio stores a brush mask as the run-length coded bytes of the mask drawn as an
RGBA image (H x W x 4 uint8, row-major), in the bit-packed format of the thi.ng
`rle-pack` package that its front end uses. A stream is:

    header   32 bits  number of values (H * W * 4)
              5 bits  word size - 1 (8: one value is one uint8 channel)
           4 x 4 bits  the four run-length field widths - 1 (Label Studio uses 3, 4, 8, 16)
    chunks   1 bit    1: a repeat (one value, many times), 0: a literal (values one by one)
             2 bits   which field width the length uses
             w bits   length - 1
             then one value (repeat) or `length` values (literal), word-size bits each
    padding  zero bits up to a whole byte

and the list of those bytes as ints is `value.rle` of a `brushlabels` result.

The format has no library we can depend on (Label Studio's converter pulls in the whole
Label Studio SDK stack and walks the bits in Python one character at a time), so both
directions are written here, vectorised: the encoder emits all fields at once with numpy,
the decoder loops over chunks, not pixels. A binary mask becomes alpha 255 on set pixels
(and 255 in R, G, B too, as Label Studio's converter writes it); a decoded mask is the
alpha channel >= 128, so antialiased edges painted in the browser count as set when they
are more than half opaque.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from amg.rle import coco_to_mask, to_coco_rle

LENGTH_WIDTHS = (3, 4, 8, 16)  # bits of the run-length field, Label Studio's choice
WORD_BITS = 8
MAX_LENGTH = 1 << LENGTH_WIDTHS[-1]  # longest run one chunk can carry
CHANNELS = 4  # RGBA
ALPHA_THRESHOLD = 128


class BrushRleError(ValueError):
    """Bytes that are not a well-formed brush RLE stream (or not of the expected size)."""


# -- values <-> brush RLE ---------------------------------------------------------------------
def encode_runs(lengths: np.ndarray, values: np.ndarray) -> list[int]:
    """Brush RLE bytes of the value stream made of runs: `values[i]` repeated `lengths[i]`
    times (lengths >= 1, values 0..255). Runs of one value become literal chunks, longer
    runs repeat chunks (split every MAX_LENGTH values)."""
    lengths = np.asarray(lengths, np.int64)
    values = np.asarray(values, np.int64)
    if lengths.shape != values.shape or lengths.ndim != 1:
        raise ValueError("lengths and values must be 1-D arrays of the same length")
    if (lengths < 1).any():
        raise ValueError("run lengths must be >= 1")
    if ((values < 0) | (values >= 1 << WORD_BITS)).any():
        raise ValueError(f"values must fit in {WORD_BITS} bits")
    total = int(lengths.sum())
    if total >= 1 << 32:
        raise ValueError("a brush RLE stream holds fewer than 2**32 values")

    # Split long runs into pieces of at most MAX_LENGTH: every piece but a run's last is full.
    pieces = -(-lengths // MAX_LENGTH)
    run_of_piece = np.repeat(np.arange(len(lengths)), pieces)
    piece_len = np.full(len(run_of_piece), MAX_LENGTH, np.int64)
    last = np.cumsum(pieces) - 1
    piece_len[last] = lengths - (pieces - 1) * MAX_LENGTH
    piece_val = values[run_of_piece]

    # The smallest field width that holds length - 1.
    widths = np.asarray(LENGTH_WIDTHS, np.int64)
    width_index = np.searchsorted((1 << widths) - 1, piece_len - 1)
    is_repeat = (piece_len > 1).astype(np.int64)

    # Each chunk is four fields: flag (1 bit), width index (2), length - 1 (w), value (8).
    # A single value is a literal of length one; its layout is the same four fields.
    fields = np.stack([is_repeat, width_index, piece_len - 1, piece_val], axis=1).ravel()
    field_bits = np.stack([np.ones_like(is_repeat), np.full_like(is_repeat, 2),
                           widths[width_index], np.full_like(is_repeat, WORD_BITS)], axis=1).ravel()
    header = [total, WORD_BITS - 1, *[w - 1 for w in LENGTH_WIDTHS]]
    header_bits = [32, 5, 4, 4, 4, 4]
    fields = np.concatenate([np.asarray(header, np.int64), fields])
    field_bits = np.concatenate([np.asarray(header_bits, np.int64), field_bits])
    return _pack_fields(fields, field_bits)


def _pack_fields(fields: np.ndarray, field_bits: np.ndarray) -> list[int]:
    """Bytes of the fields written most significant bit first, back to back, zero-padded."""
    field_of_bit = np.repeat(np.arange(len(fields)), field_bits)
    # Position of each bit inside its field, counted from the field's most significant bit.
    ends = np.cumsum(field_bits)
    shift = ends[field_of_bit] - 1 - np.arange(int(ends[-1]))
    bits = (fields[field_of_bit] >> shift) & 1
    return np.packbits(bits.astype(np.uint8)).tolist()


def decode_runs(rle: Sequence[int] | bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """(lengths, values, total) of a brush RLE stream: the stream is values[i] repeated
    lengths[i] times; total is the header's value count, which the runs add up to."""
    data = np.asarray(bytearray(rle) if isinstance(rle, (bytes, bytearray)) else rle)
    if data.ndim != 1 or data.size < 7:  # 52 header bits
        raise BrushRleError("brush RLE is shorter than its header")
    if data.dtype.kind not in "iu" or ((data < 0) | (data > 255)).any():
        raise BrushRleError("brush RLE must be a list of byte values 0..255")
    # One ASCII '0'/'1' per bit: int(bits[i:j], 2) then reads any field in one C call.
    bits = (np.unpackbits(data.astype(np.uint8)) + ord("0")).tobytes()
    n_bits = len(bits)
    total = int(bits[0:32], 2)
    word = int(bits[32:37], 2) + 1
    widths = [int(bits[37 + 4 * k: 41 + 4 * k], 2) + 1 for k in range(4)]
    pos, done = 53, 0
    lengths: list[int] = []
    values: list[int] = []
    while done < total:
        head_end = pos + 3
        if head_end > n_bits:
            raise BrushRleError(f"brush RLE ends after {done} of {total} values")
        repeat = bits[pos] == ord("1")
        width = widths[int(bits[pos + 1: head_end], 2)]
        count = int(bits[head_end: head_end + width], 2) + 1
        pos = head_end + width
        if done + count > total:
            raise BrushRleError(f"a run of {count} overflows the {total} values of the header")
        if repeat:
            if pos + word > n_bits:
                raise BrushRleError(f"brush RLE ends after {done} of {total} values")
            lengths.append(count)
            values.append(int(bits[pos: pos + word], 2))
            pos += word
        else:
            if pos + count * word > n_bits:
                raise BrushRleError(f"brush RLE ends after {done} of {total} values")
            for _ in range(count):
                lengths.append(1)
                values.append(int(bits[pos: pos + word], 2))
                pos += word
        done += count
    return np.asarray(lengths, np.int64), np.asarray(values, np.int64), total


def decode_values(rle: Sequence[int] | bytes) -> np.ndarray:
    """The whole uint8 value stream of a brush RLE (H * W * 4 values for a mask)."""
    lengths, values, _ = decode_runs(rle)
    return np.repeat(values.astype(np.uint8), lengths)


# -- binary masks <-> brush RLE ---------------------------------------------------------------
def mask_to_brush(mask: np.ndarray) -> list[int]:
    """Brush RLE of an H x W bool mask: set pixels are (255, 255, 255, 255), others 0."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be H x W, got shape {mask.shape}")
    flat = mask.astype(bool).ravel()
    if flat.size == 0:
        return encode_runs(np.zeros(0, np.int64), np.zeros(0, np.int64))
    # Runs of the row-major pixels; every pixel is four equal channel values in a row.
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    lengths = np.diff(np.r_[starts, flat.size]) * CHANNELS
    return encode_runs(lengths, flat[starts].astype(np.int64) * 255)


def brush_to_mask(rle: Sequence[int] | bytes, height: int, width: int) -> np.ndarray:
    """H x W bool mask of a brush RLE: its alpha channel >= ALPHA_THRESHOLD."""
    values = decode_values(rle)
    if values.size != height * width * CHANNELS:
        raise BrushRleError(f"brush RLE holds {values.size} values, a {height} x {width} RGBA "
                            f"image has {height * width * CHANNELS}")
    return values.reshape(height, width, CHANNELS)[..., 3] >= ALPHA_THRESHOLD


# -- COCO RLE <-> brush RLE ---------------------------------------------------------------------
def coco_to_brush(rle: dict[str, Any]) -> list[int]:
    """Brush RLE of a compressed COCO RLE dict (str or bytes counts)."""
    return mask_to_brush(coco_to_mask(rle))


def brush_to_coco(rle: Sequence[int] | bytes, height: int, width: int) -> dict[str, Any]:
    """Compressed COCO RLE dict {"size": [h, w], "counts": str} of a brush RLE."""
    encoded = to_coco_rle(brush_to_mask(rle, height, width))
    return {"size": [int(height), int(width)], "counts": encoded["counts"].decode("ascii")}
