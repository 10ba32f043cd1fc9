"""A small corpus of real image files, good and bad, written in every source format.

Each `Item` is one sample as a user might have it: the encoded image bytes,
the raw caption bytes (or none), and the reason the validator must give for
rejecting it (None for a good one). `GOOD_CHECKS` says what a good image must
look like once loaded: its upright size and a few pixels whose colours prove
alpha, palette, 16-bit, CMYK and EXIF rotation were handled.
"""

from __future__ import annotations

import csv
import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

FORMATS = ("folder", "jsonl", "csv", "tar", "parquet", "arrow")
# A resource fork is a file of its own; table formats have no place for one.
FILE_FORMATS = ("folder", "jsonl", "csv", "tar")


@dataclass(frozen=True)
class Item:
    key: str  # path without extension, relative to the corpus root
    ext: str
    data: bytes
    caption: bytes | None
    reason: str | None = None
    json_caption: bool = False  # tar: caption in a .json member instead of .txt

    @property
    def file_name(self) -> str:
        return f"{self.key}.{self.ext}"


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def halves(mode: str, size: tuple[int, int], left, right) -> Image.Image:
    """An image whose left half is `left` and right half `right`."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png() -> bytes:
    """A 100-byte PNG that declares 100,000 x 100,000 pixels: a decompression bomb."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + png_chunk(b"IEND", b""))


def strip_png(width: int, height: int) -> bytes:
    """A real, complete grey PNG of `width` x `height` (rows compressed one by one: 1,000,000 x 8 is ~8 kB)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    packer = zlib.compressobj(9)
    row = b"\x00" + b"\x80" * width  # filter byte, then the pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def exif_rotated_jpeg() -> bytes:
    """Stored 48x32, blue with a red top-left corner; EXIF orientation 6 (shown turned 90° CW)."""
    image = Image.new("RGB", (48, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 12, 12))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def noise_jpeg(seed: int, size: int = 128) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def good_items() -> list[Item]:
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    palette.paste(1, (16, 0, 32, 32))
    gray16 = np.full((32, 32), 65535, dtype=np.uint16)
    gray16[:, 16:] = 32896  # 32896 / 257 = 128
    rgb_jpeg = encode(halves("RGB", (64, 48), (255, 0, 0), (0, 0, 255)), "JPEG", quality=95)
    rgba = halves("RGBA", (32, 32), (0, 0, 0, 0), (0, 0, 255, 255))
    webp = encode(Image.new("RGB", (32, 32), (0, 255, 0)), "WEBP", lossless=True)
    cmyk = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    return [
        Item("rgb_jpeg", "jpg", rgb_jpeg, b"a red and blue square"),
        Item("sub/gray_png", "png", encode(Image.new("L", (40, 40), 100), "PNG"), b"grey"),
        Item("palette_transparent", "png", encode(palette, "PNG", transparency=0), b"palette"),
        Item("rgba_png", "png", encode(rgba, "PNG"), b"half transparent"),
        Item("la_png", "png", encode(halves("LA", (32, 32), (0, 0), (50, 255)), "PNG"),
             b"grey alpha"),
        Item("green_webp", "webp", webp, "a green square, café ☕".encode(), json_caption=True),
        Item("cmyk_jpeg", "jpg", cmyk, b"cmyk red"),
        Item("sub/gray16_png", "png", encode(Image.fromarray(gray16), "PNG"), b"sixteen bit"),
        Item("exif_rotated", "jpg", exif_rotated_jpeg(), b"rotated"),
        Item("bilevel_png", "png", encode(halves("1", (32, 32), 0, 1), "PNG"), b"black and white"),
    ]


# key -> (upright (width, height), [((x, y), expected RGB, tolerance)])
GOOD_CHECKS = {
    "rgb_jpeg": ((64, 48), [((8, 24), (255, 0, 0), 30), ((56, 24), (0, 0, 255), 30)]),
    "sub/gray_png": ((40, 40), [((20, 20), (100, 100, 100), 0)]),
    "palette_transparent": ((32, 32), [((4, 4), (255, 255, 255), 0), ((28, 4), (255, 0, 0), 0)]),
    "rgba_png": ((32, 32), [((4, 4), (255, 255, 255), 0), ((28, 4), (0, 0, 255), 0)]),
    "la_png": ((32, 32), [((4, 4), (255, 255, 255), 0), ((28, 4), (50, 50, 50), 0)]),
    "green_webp": ((32, 32), [((16, 16), (0, 255, 0), 0)]),
    "cmyk_jpeg": ((32, 32), [((16, 16), (255, 0, 0), 40)]),
    "sub/gray16_png": ((32, 32), [((4, 4), (255, 255, 255), 0), ((28, 4), (128, 128, 128), 0)]),
    # Orientation 6: the stored top-left corner is displayed at the top right.
    "exif_rotated": ((32, 48), [((28, 3), (255, 0, 0), 40), ((3, 3), (0, 0, 255), 40),
                                ((28, 44), (0, 0, 255), 40)]),
    "bilevel_png": ((32, 32), [((4, 4), (0, 0, 0), 0), ((28, 4), (255, 255, 255), 0)]),
}
GOOD_CAPTIONS = {"green_webp": "a green square, café ☕", "sub/gray_png": "grey"}


def bad_items(duplicate_of: bytes) -> list[Item]:
    truncated = noise_jpeg(1)
    return [
        Item("truncated_jpeg", "jpg", truncated[: len(truncated) // 2], b"cut short", "truncated"),
        Item("zero_bytes", "png", b"", b"empty file", "zero_bytes"),
        Item("text_as_png", "png", b"this is not an image\n" * 4, b"not an image", "undecodable"),
        Item("bomb", "png", bomb_png(), b"a bomb", "decompression_bomb"),
        # 8,000,000 pixels, under the pixel limit; resized to cover a square it would be ~100 million.
        Item("strip", "png", strip_png(1_000_000, 8), b"a strip", "max_aspect"),
        Item("tiny", "png", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), b"one pixel",
             "too_small"),
        Item("float_tiff", "tiff", encode(Image.new("F", (16, 16), 0.5), "TIFF"), b"float",
             "unsupported_mode"),
        Item("latin1_caption", "png", encode(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG"),
             "café".encode("latin-1"), "caption_not_utf8"),
        Item("no_caption", "png", encode(Image.new("RGB", (16, 16), (4, 5, 6)), "PNG"), None,
             "missing_caption"),
        Item("zz_duplicate", "jpg", duplicate_of, b"the same red and blue square", "duplicate"),
    ]


RESOURCE_FORK = Item("__MACOSX/._rgb_jpeg", "jpg", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X",
                     None, "resource_fork")


def corpus_items(fmt: str) -> list[Item]:
    """All items in the order a source must yield them (the duplicate after its original)."""
    good = good_items()
    items = good + bad_items(good[0].data)
    return ([RESOURCE_FORK] if fmt in FILE_FORMATS else []) + items


def expected(fmt: str) -> dict[str, str | None]:
    return {item.key: item.reason for item in corpus_items(fmt)}


def write_files(root: Path, items: list[Item]) -> None:
    for item in items:
        path = root / item.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item.data)


def write_folder(root: Path, items: list[Item]) -> None:
    write_files(root, items)
    for item in items:
        if item.caption is not None and item.reason != "resource_fork":
            (root / f"{item.key}.txt").write_bytes(item.caption)


def raw_text(data: bytes) -> str:
    """Caption bytes as text that encodes back to the same bytes, valid UTF-8 or not."""
    return data.decode("utf-8", errors="surrogateescape")


def write_jsonl(root: Path, items: list[Item]) -> None:
    write_files(root, items)
    lines = []
    for item in items:
        if item.reason == "resource_fork":
            continue  # found by walking the folder, not listed
        row = {"file_name": item.file_name}
        if item.caption is not None:
            row["text"] = raw_text(item.caption)
        # A Latin-1 caption stays Latin-1 bytes on disk, as a careless writer leaves it.
        lines.append(json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n")
    (root / "metadata.jsonl").write_bytes(b"".join(lines))


def write_csv(root: Path, items: list[Item]) -> None:
    write_files(root, items)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["file_name", "text"])
    for item in items:
        if item.reason != "resource_fork":
            writer.writerow([item.file_name, raw_text(item.caption) if item.caption else ""])
    (root / "metadata.csv").write_bytes(text.getvalue().encode("utf-8", "surrogateescape"))


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(root: Path, items: list[Item], shards: int = 2) -> None:
    per_shard = -(-len(items) // shards)
    for index in range(shards):
        with tarfile.open(root / f"shard-{index:03d}.tar", "w") as tar:
            for item in items[index * per_shard : (index + 1) * per_shard]:
                add_member(tar, item.file_name, item.data)
                if item.caption is None or item.reason == "resource_fork":
                    continue
                if item.json_caption:
                    # Unicode escapes in JSON, so only the text is tested here, not the bytes.
                    meta = json.dumps({"caption": item.caption.decode(), "width": 32}).encode()
                    add_member(tar, f"{item.key}.json", meta)
                else:
                    add_member(tar, f"{item.key}.txt", item.caption)


def hf_table(items: list[Item]) -> pa.Table:
    """The table `datasets` builds for features {image: Image(), text: Value("string")}."""
    images = pa.array([{"bytes": item.data, "path": item.file_name} for item in items],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    # view(): a string column holding the Latin-1 bytes unvalidated, as a careless writer leaves it.
    texts = pa.array([item.caption for item in items], type=pa.binary()).view(pa.string())
    features = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return pa.table({"image": images, "text": texts}).replace_schema_metadata(metadata)


def write_parquet(root: Path, items: list[Item]) -> None:
    pq.write_table(hf_table(items), root / "data.parquet", row_group_size=5)


def write_arrow(root: Path, items: list[Item]) -> None:
    """The `save_to_disk` layout: streaming IPC file, dataset_info.json, state.json."""
    table = hf_table(items)
    root.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=5)
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    (root / "dataset_info.json").write_text(json.dumps({"features": features, "citation": ""}))
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "corpus",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": None}
    (root / "state.json").write_text(json.dumps(state))


WRITERS = {"folder": write_folder, "jsonl": write_jsonl, "csv": write_csv, "tar": write_tar,
           "parquet": write_parquet, "arrow": write_arrow}


def build_corpus(root: Path, fmt: str) -> str:
    """Write the corpus in `fmt` under `root`; returns the source spec that reads it."""
    root.mkdir(parents=True, exist_ok=True)
    WRITERS[fmt](root, corpus_items(fmt))
    if fmt == "tar":
        return str(root / "shard-*.tar")
    if fmt == "parquet":
        return str(root / "data.parquet")
    return str(root)


# (width, height) of the mixed-aspect corpus: square, landscape, portrait and extreme shapes.
MIXED_SIZES = ((40, 40), (64, 36), (36, 64), (80, 20), (20, 80), (48, 32), (32, 48), (60, 30), (30, 60),
               (44, 40), (100, 25), (50, 50))


def mixed_aspect_items(copies: int = 2) -> list[Item]:
    """Good noisy PNGs in `MIXED_SIZES`, `copies` of each shape (different pixels), captioned."""
    items = []
    for copy in range(copies):
        for index, (width, height) in enumerate(MIXED_SIZES):
            rng = np.random.default_rng([copy, index])
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            key = f"shape{index:02d}_{copy}_{width}x{height}"
            items.append(Item(key, "png", encode(Image.fromarray(pixels), "PNG"), f"a {width} by {height} picture".encode()))
    return items


def build_mixed_aspect_folder(root: Path, copies: int = 2) -> str:
    root.mkdir(parents=True, exist_ok=True)
    write_folder(root, mixed_aspect_items(copies))
    return str(root)
