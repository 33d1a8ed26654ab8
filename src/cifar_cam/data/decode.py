"""The one image decoder: training folders (`data=folder`, `data=csv`), `predict` inputs, `serve` uploads and
`Predictor` paths.

Every image becomes uint8 RGB (H, W, 3) as a `Fit` says (data.image_size and data.resize; the model card carries
it to predict, serve and the exported files): `stretch` resizes the whole image to H x W, `crop` scales its
shorter side to fit and cuts the centre, `pad` scales its longer side to fit and letterboxes it on `fill`.
Shrinking uses cv2 INTER_AREA, enlarging INTER_LINEAR. An 8-bit colour or grayscale image without transparency
goes through cv2.imdecode IMREAD_COLOR (which applies EXIF orientation) and BGR -> RGB. The others:

- transparency (RGBA, LA, a palette or grayscale with a transparent entry): composited over white;
- 16 bits per channel (PNG, TIFF): scaled to 8 bits, round(x / 257);
- EXIF orientation: applied on every path (the image comes out upright).

The width and height are read from the header first (PIL reads only the header), so an image over
`max_pixels` is refused by name before a single pixel is decoded.

Only numpy is imported here at module level: cv2 and PIL load on first use.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cifar_cam.errors import DataError

# Bumped whenever decode_rgb's pixels change for some image kind: the data cache keys on it.
# 2: transparency over white, 16-bit scaled by 257, EXIF orientation for 16-bit images.
# 3: enlarging with INTER_LINEAR (INTER_AREA repeats pixels there); crop and pad.
DECODER_VERSION = 3
DEFAULT_FILL = (114, 114, 114)  # pad's letterbox: a mid gray, as the usual letterboxing does

# What decode_image did to an image besides decoding it (a bit each; counted and logged once per data set)
GRAY, ALPHA, HIGH_DEPTH, UPSCALED, STRETCHED, CROPPED, PADDED = (1 << i for i in range(7))
CONVERSIONS = {GRAY: "converted from grayscale", ALPHA: "composited from transparency over white",
               HIGH_DEPTH: "scaled from 16 bits", UPSCALED: "upscaled", STRETCHED: "stretched (aspect ratio changed)",
               CROPPED: "cropped", PADDED: "padded"}


@dataclass(frozen=True)
class Fit:
    """How an image of any size becomes the model's input: (height, width), the resize policy, pad's fill."""

    height: int
    width: int
    policy: str = "stretch"
    fill: tuple[int, int, int] = DEFAULT_FILL

    @classmethod
    def of(cls, size: Any, policy: str = "stretch", fill: Any = DEFAULT_FILL) -> Fit:
        """From a side (32), [H, W] or a Fit; `fill` a gray level or [R, G, B]."""
        if isinstance(size, Fit):
            return size
        h, w = (int(size), int(size)) if isinstance(size, int | np.integer) else (int(size[0]), int(size[1]))
        rgb = (int(fill),) * 3 if isinstance(fill, int | float | np.integer) else tuple(int(v) for v in fill)
        return cls(h, w, str(policy), rgb)  # type: ignore[arg-type]

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def square(self) -> bool:
        return self.height == self.width

    def to_dict(self) -> dict[str, Any]:
        """What the model card records: {"size": [H, W], "policy": ..., "fill": [R, G, B]}."""
        return {"size": [self.height, self.width], "policy": self.policy, "fill": list(self.fill)}

    @classmethod
    def from_dict(cls, card: dict[str, Any] | None, image_size: Any = 32) -> Fit:
        """A card's resize entry (older cards have none: their files were made with `stretch`)."""
        if not card:
            return cls.of(image_size)
        return cls.of(card.get("size", image_size), card.get("policy", "stretch"), card.get("fill", DEFAULT_FILL))

    def describe(self) -> str:
        """'64x96 px, pad on gray 114' for logs and /v1/model."""
        how = {"stretch": "the whole image resized (stretched if its aspect ratio differs)",
               "crop": "the shorter side resized, the centre cut out",
               "pad": f"the longer side resized, letterboxed on RGB {list(self.fill)}"}[self.policy]
        return f"{self.height}x{self.width} px: {how}"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}

_JPEG_MAGIC = b"\xff\xd8\xff"
_ORIENTATION = 0x0112  # the EXIF / TIFF orientation tag
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_pil_lock = threading.Lock()


@dataclass(frozen=True)
class Header:
    width: int
    height: int
    format: str
    mode: str
    transparent: bool
    high_depth: bool
    orientation: int


def _rawmode(im: Any) -> str:
    """The decoder's raw mode of the first tile ('RGB;16B' for a 16-bit RGB PNG), '' if unknown."""
    tiles = getattr(im, "tile", None) or []
    if not tiles:
        return ""
    args = tiles[0][3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return ""


def _orientation(im: Any) -> int:
    """EXIF orientation (1..8) from what the header already holds; never decodes pixels."""
    value: Any = None
    exif = im.info.get("exif")
    if exif:
        from PIL import Image

        try:
            value = Image.Exif()
            value.load(exif if isinstance(exif, bytes) else bytes(exif))
            value = value.get(_ORIENTATION)
        except Exception:  # an unreadable EXIF block: treat as upright
            value = None
    if value is None:
        tags = getattr(im, "tag_v2", None)  # TIFF keeps it as a tag of the image itself
        if tags is not None:
            value = tags.get(_ORIENTATION)
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment (10x faster than PIL's open), or None."""
    frame = _jpeg_frame(data)
    return None if frame is None else frame[:2]


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's start-of-frame segment, or None."""
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            components = data[i + 9] if i + 9 < n else 3
            return (width, height, components) if width and height else None
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _pil_open(data: bytes) -> Any:
    """PIL's lazy open (reads the header only). PIL's own decompression-bomb check would speak before
    ours (with a warning at half its limit): it is off around this open only; `max_pixels` guards here."""
    from PIL import Image

    with _pil_lock:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def read_header(data: bytes) -> Header | None:
    """What the header alone says (PIL's lazy open), or None if PIL cannot identify the file."""
    if data[:3] == _JPEG_MAGIC:  # 8-bit, no alpha, and cv2 applies its orientation: only the size matters
        frame = _jpeg_frame(data)
        if frame is not None:
            return Header(frame[0], frame[1], "JPEG", "L" if frame[2] == 1 else "RGB", False, False, 1)
    try:
        with _pil_open(data) as im:
            width, height = im.size
            mode = im.mode
            transparent = mode in _ALPHA_MODES or "transparency" in im.info
            high_depth = mode in _HIGH_DEPTH_MODES or ";16" in _rawmode(im) or ";32" in _rawmode(im)
            return Header(int(width), int(height), str(im.format), mode, transparent, high_depth,
                           _orientation(im))
    except Exception:  # UnidentifiedImageError, or a header so broken that a plugin trips on it
        return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image's header, without decoding its pixels; None if unidentifiable."""
    h = read_header(data)
    return None if h is None else (h.width, h.height)


def resize_rgb(img: np.ndarray, size: Any) -> np.ndarray:
    """(h, w, C) uint8 -> the Fit's (H, W, C) (a side or [H, W]: stretched); unchanged when already that size."""
    return fit_image(img, Fit.of(size))[0]


def _resized(img: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    if img.shape[0] == height and img.shape[1] == width:
        return img
    shrink = height <= img.shape[0] and width <= img.shape[1]
    out = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out[..., None] if out.ndim == 2 else out


def fit_image(img: np.ndarray, fit: Fit) -> tuple[np.ndarray, int]:
    """(h, w, C) uint8 -> (H, W, C) as `fit` says, and the conversion bits it took (UPSCALED, STRETCHED, ...)."""
    h, w = img.shape[:2]
    height, width = fit.size
    flags = UPSCALED if h < height or w < width else 0
    if (h, w) == (height, width):
        return img, 0
    if fit.policy == "stretch":
        if abs((w / h) / (width / height) - 1) > 0.02:
            flags |= STRETCHED
        return _resized(img, height, width), flags
    scale = max(height / h, width / w) if fit.policy == "crop" else min(height / h, width / w)
    flags = UPSCALED if scale > 1 else 0
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if fit.policy == "crop":
        new_h, new_w = max(new_h, height), max(new_w, width)
        scaled = _resized(img, new_h, new_w)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        out = scaled[top:top + height, left:left + width]
        return np.ascontiguousarray(out), flags | (CROPPED if (new_h, new_w) != (height, width) else 0)
    new_h, new_w = min(new_h, height), min(new_w, width)
    scaled = _resized(img, new_h, new_w)
    out = np.empty((height, width, img.shape[2]), np.uint8)
    out[...] = np.asarray(fit.fill[: img.shape[2]], np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top:top + new_h, left:left + new_w] = scaled
    return out, flags | (PADDED if (new_h, new_w) != (height, width) else 0)

def _oriented(img: np.ndarray, orientation: int) -> np.ndarray:
    """`img` turned upright for an EXIF orientation (what PIL's ImageOps.exif_transpose does)."""
    if orientation == 2:
        img = img[:, ::-1]
    elif orientation == 3:
        img = img[::-1, ::-1]
    elif orientation == 4:
        img = img[::-1]
    elif orientation == 5:
        img = img.swapaxes(0, 1)
    elif orientation == 6:
        img = img.swapaxes(0, 1)[:, ::-1]
    elif orientation == 7:
        img = img.swapaxes(0, 1)[::-1, ::-1]
    elif orientation == 8:
        img = img.swapaxes(0, 1)[::-1]
    return np.ascontiguousarray(img)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """8-bit colour (H, W, 3) and alpha (H, W) -> uint8 RGB composited over white, rounded."""
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _from_pil(data: bytes) -> np.ndarray:
    """Any image PIL reads -> uint8 RGB, upright, transparency composited over white."""
    from PIL import ImageOps

    with _pil_open(data) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in _HIGH_DEPTH_MODES:  # a 16-bit grayscale that cv2 could not read
            gray = np.asarray(im, dtype=np.float64)
            gray = np.clip(gray * 255.0 if im.mode == "F" else gray / 257.0, 0, 255)
            return np.repeat(np.rint(gray).astype(np.uint8)[..., None], 3, axis=2)
        rgba = np.asarray(im.convert("RGBA"))
    return _over_white(rgba[..., :3], rgba[..., 3])


def _to_8bit(img: np.ndarray, name: str) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(x / 257)
    if img.dtype.kind == "f":
        return np.rint(np.clip(img.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise DataError(f"cannot decode image {name}: {img.dtype} pixels are not supported (8 or 16 bits, or float); "
                    "convert it to 8-bit PNG or JPEG")


def _from_cv2_unchanged(data: bytes, name: str, header: Header) -> np.ndarray | None:
    """16-bit (or float) images, read as stored by cv2 -> uint8 RGB; None if cv2 cannot read them."""
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return None
    if header.format != "TIFF":  # IMREAD_UNCHANGED ignores EXIF orientation, except cv2's TIFF reader
        img = _oriented(img, header.orientation)
    if img.ndim == 2:
        img = img[..., None]
    channels = img.shape[2]
    if channels == 1:
        return np.repeat(_to_8bit(img, name), 3, axis=2)
    if channels == 2:  # gray + alpha
        color = np.repeat(img[..., :1], 3, axis=2)
    elif channels in (3, 4):
        color = img[..., 2::-1]  # BGR(A) -> RGB
    else:
        raise DataError(f"cannot decode image {name}: {channels} channels are not supported; "
                        "convert it to RGB or RGBA")
    if channels in (2, 4):
        if img.dtype == np.uint16:  # composite at full precision, then round once
            a = img[..., -1:].astype(np.float64) / 65535.0
            out = color.astype(np.float64) / 257.0 * a + 255.0 * (1.0 - a)
            return np.rint(np.clip(out, 0, 255)).astype(np.uint8)
        return _over_white(_to_8bit(color, name), _to_8bit(img[..., -1], name))
    return np.ascontiguousarray(_to_8bit(color, name))


def _too_big(name: str, width: int, height: int, max_pixels: int) -> DataError:
    return DataError(f"image {name} is {width}x{height} ({width * height:,} pixels), over "
                     f"predict.max_pixels={max_pixels:,}; shrink it or raise predict.max_pixels")


def _check_decoded(img: np.ndarray, name: str, max_pixels: int | None, header: Header | None) -> None:
    """The guard for a format whose header PIL cannot read: checked after decoding (cv2 caps at 2**30)."""
    if max_pixels is not None and header is None and img.shape[0] * img.shape[1] > max_pixels:
        raise _too_big(name, img.shape[1], img.shape[0], max_pixels)


def decode_rgb(data: bytes, name: str, size: Any, max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB (H, W, 3) as `size` says (a side, [H, W] or a Fit). See the module
    docstring for what happens to grayscale, transparent, 16-bit and EXIF-rotated images.

    `name` is used in errors only. With `max_pixels`, an image whose header says width x height is more
    than that is refused (DataError) before it is decoded. A file that is no image or is corrupt raises
    DataError naming it.
    """
    return decode_image(data, name, Fit.of(size), max_pixels)[0]


def decode_image(data: bytes, name: str, fit: Fit, max_pixels: int | None = None) -> tuple[np.ndarray, int]:
    """decode_rgb, with the conversion bits of what it took (GRAY, ALPHA, HIGH_DEPTH, UPSCALED, ...)."""
    import cv2

    header = read_header(data)
    if max_pixels is not None and header is not None and header.width * header.height > max_pixels:
        raise _too_big(name, header.width, header.height, max_pixels)
    flags = 0
    if header is not None:
        flags |= GRAY if header.mode in ("L", "LA", "La", "1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F") else 0
        flags |= ALPHA if header.transparent else 0
        flags |= HIGH_DEPTH if header.high_depth else 0
    img: np.ndarray | None = None
    try:
        if header is not None and header.high_depth:
            img = _from_cv2_unchanged(data, name, header)
            if img is None:
                img = _from_pil(data)
        elif header is not None and header.transparent:
            img = _from_pil(data)
        else:  # 8-bit colour or gray, no transparency
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if bgr is not None:
                _check_decoded(bgr, name, max_pixels, header)
                fitted, more = fit_image(bgr, replace(fit, fill=fit.fill[::-1]))  # pad's fill in BGR too
                return cv2.cvtColor(fitted, cv2.COLOR_BGR2RGB), flags | more
            if header is not None:  # PIL knows the format and cv2 does not
                img = _from_pil(data)
    except DataError:
        raise
    except Exception as e:  # PIL / cv2 errors on a corrupt or truncated file
        raise DataError(f"cannot decode image {name}: corrupt or truncated ({type(e).__name__}: {e}); "
                        "remove or replace it") from None
    if img is None:
        raise DataError(f"cannot decode image {name}: not an image file or corrupt; remove or replace it")
    _check_decoded(img, name, max_pixels, header)
    fitted, more = fit_image(img, fit)
    return fitted, flags | more


def conversion_counts(flags: np.ndarray) -> dict[str, int]:
    """{what: how many images} of an array of conversion bits, the kinds that happened only."""
    return {text: int(np.count_nonzero(flags & bit)) for bit, text in CONVERSIONS.items()
            if np.count_nonzero(flags & bit)}
