"""load_rgb: every awkward image mode becomes the right RGB; broken files raise DecodeError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from vitkit.data.decode import DecodeError, load_rgb


def rgb(path) -> np.ndarray:
    image = load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_grayscale_is_replicated(tmp_path):
    Image.new("L", (4, 3), 77).save(tmp_path / "g.png")
    Image.new("1", (4, 3), 1).save(tmp_path / "b.bmp")
    assert (rgb(tmp_path / "g.png") == 77).all()
    assert (rgb(tmp_path / "b.bmp") == 255).all()
    assert rgb(tmp_path / "g.png").shape == (3, 4, 3)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)  # red, transparent
    image.putpixel((1, 0), 1)  # blue, opaque
    image.save(tmp_path / "p.png", transparency=0)
    image.save(tmp_path / "p.gif", transparency=0)
    for name in ("p.png", "p.gif"):
        pixels = rgb(tmp_path / name)
        assert pixels[0, 0].tolist() == [255, 255, 255]
        assert pixels[0, 1].tolist() == [0, 0, 255]


def test_rgba_and_la_are_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent black -> white
    rgba.putpixel((1, 0), (200, 0, 0, 128))  # half red -> pink
    rgba.save(tmp_path / "a.png")
    pixels = rgb(tmp_path / "a.png").astype(int)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert abs(pixels[0, 1] - np.array([227, 127, 127])).max() <= 2
    Image.new("LA", (1, 1), (0, 0)).save(tmp_path / "la.png")
    assert rgb(tmp_path / "la.png")[0, 0].tolist() == [255, 255, 255]


def test_cmyk(tmp_path):
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # cyan 0, M+Y: red
    pixels = rgb(tmp_path / "c.jpg").astype(int)
    assert pixels[..., 0].min() > 200 and pixels[..., 1:].max() < 60


def test_cmyk_with_icc_profile_goes_through_the_profile(tmp_path):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    # An sRGB profile on a CMYK image is invalid: the fallback formula must still give red.
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.tif", icc_profile=profile)
    pixels = rgb(tmp_path / "c.tif").astype(int)
    assert pixels[..., 0].min() > 200 and pixels[..., 1:].max() < 60


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bit
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    assert rgb(tmp_path / "d.png")[0, :, 0].tolist() == [0, 1, 128, 255]
    # Mode I (32-bit) from TIFF with 16-bit values.
    Image.fromarray(values.astype(np.int32), "I").save(tmp_path / "d.tif")
    assert rgb(tmp_path / "d.tif")[0, :, 0].tolist() == [0, 1, 128, 255]


def test_float_tiff_in_unit_range(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(tmp_path / "f.tif")
    assert rgb(tmp_path / "f.tif")[0, :, 1].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    # A 3 wide x 2 high image, red on the left column; orientation 6 = "rotate 90° clockwise to view".
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[:, 0] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "r.png", exif=exif.tobytes())
    upright = rgb(tmp_path / "r.png")
    assert upright.shape == (3, 2, 3)  # now 2 wide x 3 high
    assert (upright[0, :, 0] == 255).all() and (upright[1:, :, 0] == 0).all()  # left column -> top row


def test_exif_orientation_of_a_jpeg(tmp_path):
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :8] = 255  # white left quarter
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 8  # "rotate 90° counter-clockwise to view": the left side goes to the bottom
    image.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    upright = rgb(tmp_path / "r.jpg").astype(int)
    assert upright.shape == (32, 16, 3)
    assert upright[-4:].mean() > 200 and upright[:20].mean() < 50
    image.save(tmp_path / "plain.jpg", quality=95)  # no EXIF: unchanged
    assert rgb(tmp_path / "plain.jpg").shape == (16, 32, 3)


def test_truncated_jpeg_raises(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    (tmp_path / "t.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with Image.open(tmp_path / "t.jpg") as lazily:  # opening alone succeeds: the header is intact
        assert lazily.size == (64, 64)
    with pytest.raises(DecodeError, match="t.jpg"):
        load_rgb(tmp_path / "t.jpg")


def test_not_an_image_and_missing_file_raise(tmp_path):
    (tmp_path / "x.jpg").write_text("not a jpeg")
    with pytest.raises(DecodeError, match="x.jpg"):
        load_rgb(tmp_path / "x.jpg")
    with pytest.raises(DecodeError, match="missing.png"):
        load_rgb(tmp_path / "missing.png")


def test_refuses_to_run_when_truncated_images_are_padded(tmp_path, monkeypatch):
    from PIL import ImageFile

    Image.new("RGB", (2, 2)).save(tmp_path / "ok.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_rgb(tmp_path / "ok.png")
