"""images.decode_rgb: the one decoder of data=folder, predict and Predictor (issue 16, item 1)."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from cifar_cam.data import decode as images
from cifar_cam.data import sources as data
from cifar_cam.data.decode import IMAGE_SUFFIXES, decode_rgb, header_size
from cifar_cam.errors import DataError
from conftest import SHARED_ARCHIVE


def _old_decode(data: bytes, name: str, size: int) -> np.ndarray:
    """data._decode as it was before images.py: the pixels cached data and figures were made with; since decoder 3
    an image enlarged along either side is resized with INTER_LINEAR (INTER_AREA repeated its pixels there)."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"cannot decode image {name}: not an image file or corrupt; remove or replace it")
    if img.shape[0] != size or img.shape[1] != size:
        shrink = img.shape[0] >= size and img.shape[1] >= size
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _pil_bytes(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _exif(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex.tobytes()


# ------------------------------------------------------------------- the 8-bit path does not move


def _plain_cases() -> list[tuple[str, bytes]]:
    cases = []
    for h, w in [(32, 32), (40, 56), (17, 300), (64, 64)]:
        rgb = _noise(h, w, seed=h * w)
        cases.append((f"rgb {w}x{h} .jpg", cv2.imencode(".jpg", rgb)[1].tobytes()))
        cases.append((f"rgb {w}x{h} .png", cv2.imencode(".png", rgb)[1].tobytes()))
        cases.append((f"gray {w}x{h} .jpg", cv2.imencode(".jpg", rgb[..., 0])[1].tobytes()))
        cases.append((f"gray {w}x{h} .png", cv2.imencode(".png", rgb[..., 0])[1].tobytes()))
    cases.append(("pil rgb .png", _pil_bytes(Image.fromarray(_noise(30, 20)), "PNG")))
    cases.append(("exif-6 .jpg", _pil_bytes(Image.fromarray(_noise(24, 40)), "JPEG", exif=_exif(6))))
    if SHARED_ARCHIVE.exists():  # the project's own CIFAR JPEGs
        with tarfile.open(SHARED_ARCHIVE) as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(".jpg"):
                    f = tf.extractfile(member)
                    assert f is not None
                    cases.append((member.name, f.read()))
                    if len(cases) >= 60:
                        break
    return cases


@pytest.mark.parametrize("size", [32, 24])
def test_8bit_images_decode_bit_identical_to_the_old_decoder(size: int) -> None:
    for name, encoded in _plain_cases():
        old = _old_decode(encoded, name, size)
        new = decode_rgb(encoded, name, size)
        assert new.dtype == np.uint8 and new.shape == (size, size, 3), name
        assert np.array_equal(new, old), name
        assert np.array_equal(decode_rgb(encoded, name, size, max_pixels=10**8), old), name


def test_data_uses_the_shared_decoder_and_suffixes() -> None:
    from cifar_cam.data import decode_pool, listing

    assert listing.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    assert decode_pool.decode_image is images.decode_image
    assert not hasattr(data, "_decode")
    assert {".jpg", ".png", ".webp", ".tif", ".tiff", ".gif"} <= IMAGE_SUFFIXES


def test_importing_images_loads_neither_torch_nor_cv2() -> None:
    code = "import sys, cifar_cam.data.decode; print(sorted({'torch', 'cv2', 'PIL'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------- the other images a user has


def test_grayscale_becomes_rgb() -> None:
    gray = np.full((10, 20), 77, np.uint8)
    gray[:, 10:] = 200
    out = decode_rgb(_pil_bytes(Image.fromarray(gray), "PNG"), "g.png", 20)
    assert out.shape == (20, 20, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert (out[:, :10] == 77).all() and (out[:, 10:] == 200).all()


def test_rgba_is_composited_over_white() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (200, 100, 50, 128)  # half transparent: round(c * 128/255 + 255 * 127/255)
    rgba[:, 4:] = (10, 20, 30, 0)  # fully transparent: white
    out = decode_rgb(_pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), "a.png", 8)
    assert (out[:, :4] == (227, 177, 152)).all()
    assert (out[:, 4:] == 255).all()
    opaque = rgba.copy()
    opaque[..., 3] = 255
    assert (decode_rgb(_pil_bytes(Image.fromarray(opaque, "RGBA"), "PNG"), "o.png", 8) == opaque[..., :3]).all()


def _palette() -> Image.Image:
    p = Image.new("P", (8, 4), 1)
    p.putpalette([0, 0, 0, 0, 255, 0, 255, 0, 0] + [0] * 759)  # 0 black, 1 green (transparent), 2 red
    p.paste(2, (0, 0, 4, 4))
    return p


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_is_composited_over_white(fmt: str) -> None:
    out = decode_rgb(_pil_bytes(_palette(), fmt, transparency=1), f"p.{fmt.lower()}", 8)
    assert (out[:4, :4] == (255, 0, 0)).all()  # opaque red (resized 8x4 -> 8x8, rows doubled)
    assert (out[:, 4:] == 255).all()  # the transparent entry


def test_gray_alpha_and_gray_transparency_over_white() -> None:
    la = Image.new("LA", (4, 4), (100, 0))
    assert (decode_rgb(_pil_bytes(la, "PNG"), "la.png", 4) == 255).all()
    gray = Image.new("L", (4, 4), 7)
    assert (decode_rgb(_pil_bytes(gray, "PNG", transparency=7), "lt.png", 4) == 255).all()


def test_16bit_png_is_scaled_to_8_bits() -> None:
    gray16 = np.full((6, 6), 40000, np.uint16)  # round(40000 / 257) = 156; cv2's 8-bit read gives 40000 >> 8
    out = decode_rgb(cv2.imencode(".png", gray16)[1].tobytes(), "g16.png", 6)
    assert (out == 156).all()
    bgr16 = np.zeros((6, 6, 3), np.uint16)
    bgr16[...] = (65535, 40000, 1000)  # B, G, R as cv2 writes them
    out = decode_rgb(cv2.imencode(".png", bgr16)[1].tobytes(), "c16.png", 6)
    assert (out == (4, 156, 255)).all()  # R = round(1000 / 257) = 4, not 1000 >> 8 = 3


def test_16bit_rgba_png_is_composited_over_white() -> None:
    bgra16 = np.zeros((4, 4, 4), np.uint16)
    bgra16[:, :2] = (0, 0, 65535, 65535)  # opaque red
    bgra16[:, 2:] = (0, 0, 65535, 0)  # transparent
    out = decode_rgb(cv2.imencode(".png", bgra16)[1].tobytes(), "a16.png", 4)
    assert (out[:, :2] == (255, 0, 0)).all() and (out[:, 2:] == 255).all()


def _halves(h: int, w: int) -> np.ndarray:
    """Top half red, bottom half blue."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2] = (255, 0, 0)
    img[h // 2:] = (0, 0, 255)
    return img


def test_exif_orientation_6_jpeg_comes_out_upright() -> None:
    encoded = _pil_bytes(Image.fromarray(_halves(24, 40)), "JPEG", quality=95, exif=_exif(6))
    assert header_size(encoded) == (40, 24)  # as stored
    out = decode_rgb(encoded, "rot.jpg", 32)
    # orientation 6 = turn 90 degrees clockwise to view: the stored top (red) ends on the right
    assert out[:, 26:, 0].min() > 200 and out[:, 26:, 2].max() < 60
    assert out[:, :6, 2].min() > 200 and out[:, :6, 0].max() < 60
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(encoded))).convert("RGB"))
    assert np.abs(out.astype(int) - images.resize_rgb(upright, 32).astype(int)).max() <= 2


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_a_16bit_image(fmt: str, orientation: int) -> None:
    # cv2 IMREAD_UNCHANGED ignores EXIF orientation for PNG (its TIFF reader applies it itself)
    gray16 = (np.arange(12 * 20, dtype=np.uint16).reshape(12, 20) * 257)
    encoded = _pil_bytes(Image.fromarray(gray16), fmt, exif=_exif(orientation))
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(encoded))))
    expected = np.repeat(((upright.astype(np.uint32) + 128) // 257).astype(np.uint8)[..., None], 3, axis=2)
    out = decode_rgb(encoded, f"o.{fmt.lower()}", 8)
    assert np.array_equal(out, images.resize_rgb(expected, 8))


def test_webp_lossless_and_with_alpha() -> None:
    rgb = _noise(16, 16)
    assert np.array_equal(decode_rgb(_pil_bytes(Image.fromarray(rgb), "WEBP", lossless=True), "x.webp", 16), rgb)
    rgba = np.dstack([rgb, np.zeros((16, 16), np.uint8)])
    out = decode_rgb(_pil_bytes(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True), "a.webp", 16)
    assert (out == 255).all()


def test_a_1x300_strip_is_resized_whole_without_crop() -> None:
    strip = _halves(300, 1)
    out = decode_rgb(cv2.imencode(".png", strip[..., ::-1])[1].tobytes(), "strip.png", 32)
    assert out.shape == (32, 32, 3)
    assert (out[:16] == (255, 0, 0)).all() and (out[16:] == (0, 0, 255)).all()


def test_a_2000x1000_image_is_resized_whole_without_crop() -> None:
    img = np.zeros((1000, 2000, 3), np.uint8)
    img[:, :1000] = (0, 255, 0)
    img[:, 1000:] = (255, 255, 0)
    out = decode_rgb(cv2.imencode(".png", img[..., ::-1])[1].tobytes(), "wide.png", 32)
    assert out.shape == (32, 32, 3)
    assert (out[:, :16] == (0, 255, 0)).all() and (out[:, 16:] == (255, 255, 0)).all()


# ------------------------------------------------------------------- guards and errors


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _huge_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with one row of pixels: never decodable, tiny."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * (1 + 3 * 16))) + _png_chunk(b"IEND", b""))


def test_header_size_reads_only_the_header() -> None:
    limit = Image.MAX_IMAGE_PIXELS
    assert header_size(_huge_png(100_000, 70_000)) == (100_000, 70_000)  # 7e9 pixels: PIL's own bomb check
    assert Image.MAX_IMAGE_PIXELS == limit
    assert header_size(cv2.imencode(".jpg", _noise(20, 30))[1].tobytes()) == (30, 20)
    assert header_size(b"not an image") is None


@pytest.mark.parametrize("kw", [{}, {"progressive": True}, {"exif": _exif(6)}, {"optimize": True}], ids=str)
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_size_from_the_frame_header_matches_pil(mode: str, kw: dict[str, object]) -> None:
    encoded = _pil_bytes(Image.fromarray(_noise(37, 53)).convert(mode), "JPEG", **kw)
    assert images._jpeg_size(encoded) == Image.open(io.BytesIO(encoded)).size == (53, 37)
    assert images._jpeg_size(encoded[:20]) is None  # cut before the frame header: PIL decides


def test_over_max_pixels_is_refused_by_name_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although the header is over max_pixels")

    jpeg = _pil_bytes(Image.fromarray(_noise(20, 30)), "JPEG")
    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(DataError, match=r"image big\.png is 100000x70000 .*over predict\.max_pixels=40,000,000"):
        decode_rgb(_huge_png(100_000, 70_000), "big.png", 32, max_pixels=40_000_000)
    with pytest.raises(DataError, match=r"image a\.jpg is 30x20 .*max_pixels=599"):
        decode_rgb(jpeg, "a.jpg", 32, max_pixels=599)


def test_at_max_pixels_is_decoded() -> None:
    jpeg = cv2.imencode(".jpg", _noise(20, 30))[1].tobytes()
    assert decode_rgb(jpeg, "a.jpg", 32, max_pixels=600).shape == (32, 32, 3)


@pytest.mark.parametrize("kind", ["garbage", "truncated png", "truncated 16-bit png", "empty", "cut jpeg"])
def test_a_corrupt_file_is_a_data_error_naming_it(kind: str) -> None:
    png = cv2.imencode(".png", _noise(64, 64))[1].tobytes()
    png16 = cv2.imencode(".png", _noise(64, 64).astype(np.uint16) * 257)[1].tobytes()
    jpeg = cv2.imencode(".jpg", _noise(64, 64))[1].tobytes()
    encoded = {"garbage": b"not an image", "truncated png": png[: len(png) // 2],
               "truncated 16-bit png": png16[: len(png16) // 2], "empty": b"",
               "cut jpeg": jpeg[:40]}[kind]
    with pytest.raises(DataError, match=r"cannot decode image dir/bad\.png"):
        decode_rgb(encoded, "dir/bad.png", 32)


def test_decoding_a_folder_file(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    Image.fromarray(_noise(40, 30)).save(path)
    assert decode_rgb(path.read_bytes(), str(path), 32).shape == (32, 32, 3)


def test_the_data_cache_keys_on_the_decoder_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cached arrays of an older decoder (other pixels for transparent or 16-bit images) are not reused."""
    from cifar_cam.data import files
    from cifar_cam.data.sources import DataSpec, build_splits

    monkeypatch.setenv("CIFAR_CAM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "tree"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        cv2.imwrite(str(root / split / "a" / "x.png"), np.zeros((4, 4, 3), np.uint8))
    spec = DataSpec("folder", str(root), val_size=0, fit=images.Fit.of(4))
    build_splits(spec)
    before = sorted(p.name for p in (tmp_path / "cache").iterdir())
    build_splits(spec)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == before  # the same decoder: read back
    monkeypatch.setattr(files, "DECODER_VERSION", files.DECODER_VERSION + 1)
    build_splits(spec)
    assert len(list((tmp_path / "cache").iterdir())) == 2 * len(before)  # another decoder: decoded again
