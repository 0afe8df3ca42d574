"""Image files: every Pillow mode read with its real content (or refused by name), EXIF, animation, size guard."""

import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageCms

from dopsd.config import load_config
from dopsd.data.dataset import DatasetError, check_dataset, load_dataset, load_image
from dopsd.data.image_files import ImageRefused, detail_lost, read_rgb, to_rgb

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # the content every colour file carries
GRAY = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
ALPHA = np.tile(np.array([0, 64, 128, 255], dtype=np.uint8), (8, 2))
ON_WHITE = np.rint(RGB * (ALPHA[..., None] / 255) + 255 * (1 - ALPHA[..., None] / 255))
GRAY_ON_WHITE = np.rint(GRAY * (ALPHA / 255) + 255 * (1 - ALPHA / 255))


def rgb_image():
    return Image.fromarray(RGB)


def gray3(a):
    return np.repeat(np.asarray(a, dtype=np.float64)[..., None], 3, axis=2)


def lab_image():
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    return ImageCms.applyTransform(rgb_image(), to_lab)


def lab_to_rgb(img):  # the colour-managed conversion, as reference
    to_rgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return np.asarray(ImageCms.applyTransform(img, to_rgb))


def palette_with_transparency():
    img = Image.fromarray(GRAY).quantize(16)
    img.info["transparency"] = 0
    return img


def expected_palette_with_transparency(img):
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
    rgb[np.asarray(img) == 0] = 255
    return rgb


# (case, extension, save kwargs, image builder, expected RGB (8, 8, 3) from the built image, tolerance)
CASES = [
    ("1", "png", {}, lambda: Image.fromarray(GRAY > 127), lambda im: gray3((GRAY > 127) * 255), 0),
    ("L", "png", {}, lambda: Image.fromarray(GRAY), lambda im: gray3(GRAY), 0),
    ("L-jpeg", "jpg", {"quality": 100}, lambda: Image.fromarray(GRAY), lambda im: gray3(GRAY), 3),
    ("L-bmp", "bmp", {}, lambda: Image.fromarray(GRAY), lambda im: gray3(GRAY), 0),
    ("LA", "png", {}, lambda: Image.fromarray(np.dstack([GRAY, ALPHA]), "LA"), lambda im: gray3(GRAY_ON_WHITE), 1),
    ("LA-tiff", "tif", {}, lambda: Image.fromarray(np.dstack([GRAY, ALPHA]), "LA"), lambda im: gray3(GRAY_ON_WHITE), 1),
    ("P", "png", {}, lambda: rgb_image().quantize(64), lambda im: np.asarray(im.convert("RGB")), 0),
    ("P-gif", "gif", {}, lambda: rgb_image().quantize(64), lambda im: np.asarray(im.convert("RGB")), 0),
    ("P-transparent", "png", {}, palette_with_transparency, expected_palette_with_transparency, 0),
    (
        "PA-tiff",
        "tif",
        {},
        lambda: Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA").convert("PA"),
        lambda im: np.rint(
            np.asarray(im.convert("RGB"), float) * (ALPHA[..., None] / 255) + 255 * (1 - ALPHA[..., None] / 255)
        ),
        1,
    ),
    ("RGB", "png", {}, rgb_image, lambda im: RGB, 0),
    ("RGB-jpeg", "jpg", {"quality": 100, "subsampling": 0}, rgb_image, lambda im: RGB, 6),
    ("RGB-webp", "webp", {"lossless": True}, rgb_image, lambda im: RGB, 0),
    ("RGB-bmp", "bmp", {}, rgb_image, lambda im: RGB, 0),
    ("RGBA", "png", {}, lambda: Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA"), lambda im: ON_WHITE, 1),
    (
        "RGBA-webp",
        "webp",
        {"lossless": True, "exact": True},
        lambda: Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA"),
        lambda im: ON_WHITE,
        1,
    ),
    ("CMYK-jpeg", "jpg", {"quality": 100, "subsampling": 0}, lambda: rgb_image().convert("CMYK"), lambda im: RGB, 8),
    ("CMYK-tiff", "tif", {}, lambda: rgb_image().convert("CMYK"), lambda im: RGB, 0),
    ("YCbCr-tiff", "tif", {}, lambda: rgb_image().convert("YCbCr"), lambda im: RGB, 3),
    ("LAB-tiff", "tif", {}, lab_image, lambda im: lab_to_rgb(im), 1),
    ("I;16", "png", {}, lambda: Image.fromarray(GRAY.astype(np.uint16) * 257), lambda im: gray3(GRAY), 0),
    ("I;16-tiff", "tif", {}, lambda: Image.fromarray(GRAY.astype(np.uint16) * 257), lambda im: gray3(GRAY), 0),
    (
        "I;16B-tiff",
        "tif",
        {},
        lambda: Image.frombytes("I;16B", (8, 8), (GRAY.astype(">u2") * 257).tobytes()),
        lambda im: gray3(GRAY),
        0,
    ),
    ("I-16bit-tiff", "tif", {}, lambda: Image.fromarray(GRAY.astype(np.int32) * 257, "I"), lambda im: gray3(GRAY), 0),
    ("I-8bit-tiff", "tif", {}, lambda: Image.fromarray(GRAY.astype(np.int32), "I"), lambda im: gray3(GRAY), 0),
    ("F-unit-tiff", "tif", {}, lambda: Image.fromarray(GRAY.astype(np.float32) / 255, "F"), lambda im: gray3(GRAY), 0),
    ("F-255-tiff", "tif", {}, lambda: Image.fromarray(GRAY.astype(np.float32), "F"), lambda im: gray3(GRAY), 0),
]


@pytest.mark.parametrize("case, ext, kwargs, build, expected, tol", CASES, ids=[c[0] for c in CASES])
def test_real_files_of_every_mode_load_with_their_content(tmp_path, case, ext, kwargs, build, expected, tol):
    img = build()
    path = tmp_path / f"x.{ext}"
    img.save(path, **kwargs)
    with Image.open(path) as check:  # the file really holds the mode under test
        assert check.mode.split(";")[0] == case.split("-")[0].split(";")[0] or case in ("L-jpeg", "P-gif", "L-bmp")
    got = np.asarray(load_image(path, (8, 8)), dtype=np.float64)
    assert got.shape == (8, 8, 3)
    assert np.abs(got - np.asarray(expected(img), dtype=np.float64)).max() <= tol, case


def test_a_16_bit_png_keeps_its_content_instead_of_turning_white(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode == "I;16"
    got = np.asarray(load_image(tmp_path / "deep.png", (48, 64)))[..., 0].astype(float)
    assert got.min() == 0 and got.max() == 255 and 120 < got.mean() < 135  # a ramp, not solid white
    assert np.abs(got - ramp / 257).max() <= 1


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, depth: int, colour: int, rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def test_a_16_bit_rgb_png_is_read_with_its_colours(tmp_path):
    pixels = (RGB.astype(">u2") * 257).reshape(8, 24)
    (tmp_path / "rgb16.png").write_bytes(_png(8, 8, 16, 2, b"".join(b"\0" + row.tobytes() for row in pixels)))
    assert (np.asarray(load_image(tmp_path / "rgb16.png", (8, 8))) == RGB).all()


def test_every_pillow_mode_converts_or_is_refused_by_name():
    for mode in Image.MODES:
        img = Image.new(mode, (6, 4))
        try:
            out = to_rgb(img)
        except ImageRefused as err:
            assert f"mode {mode!r}" in str(err) and "save it as 8-bit RGB" in str(err)
            continue
        assert out.mode == "RGB" and out.size == (6, 4), mode


def test_images_without_a_white_level_are_refused_by_name_in_the_dataset_check(tmp_path):
    big = np.kron(GRAY, np.ones((4, 4), dtype=np.uint8))  # 32×32
    Image.fromarray(big.astype(np.int32) * 1000, "I").save(tmp_path / "int.tif")
    Image.fromarray(big.astype(np.float32) * 10, "F").save(tmp_path / "float.tif")
    Image.fromarray(big).save(tmp_path / "ok.png")
    for name in ("int", "float", "ok"):
        (tmp_path / f"{name}.txt").write_text("a red circle")
    c = load_config("mini", [f"data.path={tmp_path}"])
    with pytest.raises(DatasetError) as err:
        load_dataset(c.data, c.model)
    text = str(err.value)
    lo, hi = int(GRAY.min()), int(GRAY.max())
    assert f"float.tif: mode 'F' (float pixels from {lo * 10} to {hi * 10}) has no known white level" in text
    assert f"int.tif: mode 'I' (32-bit integer pixels from {lo * 1000} to {hi * 1000})" in text
    assert "save it as 8-bit RGB" in text
    assert len(err.value.problems) == 2


def test_exif_orientation_is_applied_before_sizes_buckets_and_the_minimum_side(tmp_path):
    stored = Image.fromarray(RNG.integers(0, 256, (32, 64, 3), dtype=np.uint8))  # 64 wide, 32 tall as stored
    exif = stored.getexif()
    exif[0x0112] = 6  # shown turned 90°: 32 wide, 64 tall
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    (tmp_path / "photo.txt").write_text("a red circle")
    c = load_config(
        "mini",
        [f"data.path={tmp_path}", "data.buckets=true", "model.height=32", "model.width=32", "data.bucket_multiple=8"],
    )
    report = check_dataset(c.data, c.model)
    (ex,) = report.examples
    assert ex.size == (32, 64) and ex.bucket[0] > ex.bucket[1]  # a portrait bucket for a portrait photo
    assert load_image(ex.image, ex.bucket).size == (ex.bucket[1], ex.bucket[0])
    assert any("turned upright as their EXIF orientation" in n and "photo.jpg" in n for n in report.notes)


def test_animated_files_are_refused_and_stills_of_the_same_types_are_read(tmp_path):
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for name in ("anim_gif.gif", "anim_webp.webp", "anim_png.png"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "still_gif.gif")
    frames[0].save(tmp_path / "still_webp.webp")
    for p in tmp_path.iterdir():
        p.with_suffix(".txt").write_text("a red circle")
    c = load_config("mini", [f"data.path={tmp_path}"])
    with pytest.raises(DatasetError) as err:
        load_dataset(c.data, c.model)
    text = str(err.value)
    for name, fmt in (("anim_gif.gif", "GIF"), ("anim_webp.webp", "WEBP"), ("anim_png.png", "PNG")):
        assert f"{name}: {fmt} with 3 frames: dopsd trains on still images" in text
    assert "still_" not in text and len(err.value.problems) == 3


def test_oversized_and_empty_files_are_refused_with_a_reason(tmp_path):
    row = b"\0" + b"\0" * 2500  # 1-bit gray, 20000 px wide; the pixel data never gets read
    (tmp_path / "bomb.png").write_bytes(_png(20000, 20000, 1, 0, row))
    (tmp_path / "big.png").write_bytes(_png(10000, 10000, 1, 0, b"\0" + b"\0" * 1250))
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("bomb", "big", "empty"):
        (tmp_path / f"{name}.txt").write_text("a red circle")
    c = load_config("mini", [f"data.path={tmp_path}"])
    with pytest.raises(DatasetError) as err:
        load_dataset(c.data, c.model)
    text = str(err.value)
    assert "bomb.png: 400 Mpixel, more than Pillow's limit of 89 Mpixel" in text
    assert "big.png: 100 Mpixel, more than Pillow's limit" in text and "downscale it" in text
    assert "empty.png: the file is empty (0 bytes)" in text and len(err.value.problems) == 3


def linear_rgb_profile(name: str = "Linear RGB (test)") -> bytes:
    """A minimal ICC v2 display profile: sRGB's primaries (D50-adapted) with a linear (gamma 1) curve."""

    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(x, y, z):
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    text = name.encode("ascii") + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 8 + b"\0" * 3 + b"\0" * 67
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0100) + b"\0\0"
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
        (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)),
        (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (
        struct.pack(">I", size)
        + b"none"
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 4
        + b"\0" * 4
        + b"\0" * 8
        + b"\0" * 8
        + struct.pack(">I", 0)
        + s15(0.9642)
        + s15(1.0)
        + s15(0.8249)
        + b"\0" * 4
        + b"\0" * 16
        + b"\0" * 28
    )
    assert len(header) == 128, len(header)
    return header + struct.pack(">I", len(tags)) + table + data


def test_colour_profiles_are_converted_to_srgb_and_a_broken_one_is_said(tmp_path):
    Image.new("RGB", (24, 24), (128, 128, 128)).save(tmp_path / "linear.png", icc_profile=linear_rgb_profile())
    Image.new("RGB", (24, 24), (128, 128, 128)).save(tmp_path / "broken.png", icc_profile=b"not a profile" * 8)
    for name in ("linear", "broken"):
        (tmp_path / f"{name}.txt").write_text("a red circle")
    linear = 128 / 255
    expected = 255 * (1.055 * linear ** (1 / 2.4) - 0.055)  # the same light, written in sRGB's curve
    assert np.abs(np.asarray(load_image(tmp_path / "linear.png", (24, 24)), float) - expected).max() <= 1
    assert (np.asarray(load_image(tmp_path / "broken.png", (24, 24))) == 128).all()
    notes = " ".join(
        check_dataset(load_config("mini", [f"data.path={tmp_path}"]).data, load_config("mini").model).notes
    )
    assert (
        "2 image(s) carry a colour profile other than sRGB" in notes
        and "linear.png (Linear RGB (test) → sRGB)" in notes
    )
    assert "broken.png (embedded profile cannot be applied" in notes and "read as sRGB)" in notes


def test_a_multi_picture_jpeg_from_a_camera_is_read_as_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), (250, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 250))]
    frames[0].save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=frames[1:], quality=95)
    with Image.open(tmp_path / "camera.jpg") as img:
        assert img.format == "MPO" and img.n_frames == 2
    got = np.asarray(load_image(tmp_path / "camera.jpg", (32, 32)), float)
    assert np.abs(got - [250, 0, 0]).max() <= 4


def test_transparency_is_flattened_onto_white_and_said(tmp_path):
    Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA").resize((24, 24), Image.Resampling.NEAREST).save(
        tmp_path / "cut.png"
    )
    Image.fromarray(np.dstack([RGB, np.full_like(ALPHA, 255)]), "RGBA").resize((24, 24)).save(tmp_path / "opaque.png")
    for name in ("cut", "opaque"):
        (tmp_path / f"{name}.txt").write_text("a red circle")
    _, facts = read_rgb(tmp_path / "cut.png")
    assert facts.transparent and not read_rgb(tmp_path / "opaque.png")[1].transparent
    c = load_config("mini", [f"data.path={tmp_path}"])
    notes = check_dataset(c.data, c.model).notes
    assert any("1 image(s) have transparent pixels, flattened onto white: cut.png" in n for n in notes)


def test_the_miniature_loses_about_40_percent_of_its_grain_when_a_large_copy_is_downscaled(tmp_path):
    """Measured on world renders: each enlarged 16× (as a large image of the same scene), written as PNG and read
    back by the loader at 24×24; the grain is what differs from the same scene rendered without grain."""
    from dopsd.data.images import to_pil
    from dopsd.mini import world

    g = __import__("torch").Generator().manual_seed(0)
    scenes = [world.random_scene(g) for _ in range(16)]
    kept = total = 0.0
    for i, (grainy, plain) in enumerate(
        zip(to_pil(world.render(scenes)), to_pil(world.render([replace(s, grain=None) for s in scenes])))
    ):
        back = []
        for tag, img in (("g", grainy), ("p", plain)):
            path = tmp_path / f"{i}{tag}.png"
            img.resize((24 * 16, 24 * 16), Image.Resampling.NEAREST).save(path)
            back.append(np.asarray(load_image(path, (24, 24)), dtype=np.float64))
        kept += ((back[0] - back[1]) ** 2).sum()
        total += ((np.asarray(grainy, dtype=np.float64) - np.asarray(plain, dtype=np.float64)) ** 2).sum()
    lost = 1 - kept / total
    print(f"miniature grain variance lost by a 16x downscale to 24x24: {lost:.3f}")
    assert 0.35 < lost < 0.45
    assert abs(lost - detail_lost(24, 24, 16)) < 0.03  # the dataset check's own measurement agrees
