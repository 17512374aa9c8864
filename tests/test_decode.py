"""Tests for stage 2, decode and resize."""

import hashlib
import io
import pathlib

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageOps, UnidentifiedImageError

from benchmarks.jpeg_parity import corrupted_jpegs, jpeg_variants, our_pixels, tf_pixels
from models.handles import IMAGE_INPUT
from tests.png_chunks import png, png_declaring
from transforms.decode import (DEFAULT_MAX_IMAGE_PIXELS, DecodedImage, DecodeImages,
                               decode_and_resize, decode_image, resize_for_model)
from transforms.failures import DECODE, FAILURES_TAG, Failure
from transforms.read import ImageFile

SAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'sample_images'
SAMPLE_NAMES = ('astronaut.png', 'camera.png', 'chelsea.png', 'coffee.png',
                'hubble_deep_field.jpg', 'rocket.jpg')
RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **params)
  return buffer.getvalue()


def _quadrants(width=64, height=48) -> Image.Image:
  """Red, green / blue, white quadrants: placement and colour both show in the decoded pixels."""
  image = Image.new('RGB', (width, height))
  half_w, half_h = width // 2, height // 2
  image.paste(RED, (0, 0, half_w, half_h))
  image.paste(GREEN, (half_w, 0, width, half_h))
  image.paste(BLUE, (0, half_h, half_w, height))
  image.paste(WHITE, (half_w, half_h, width, height))
  return image


def _assert_quadrants(rgb: Image.Image, tolerance: int) -> None:
  width, height = rgb.size
  centres = {(width // 4, height // 4): RED, (3 * width // 4, height // 4): GREEN,
             (width // 4, 3 * height // 4): BLUE, (3 * width // 4, 3 * height // 4): WHITE}
  pixels = np.asarray(rgb).astype(int)
  for (x, y), colour in centres.items():
    np.testing.assert_allclose(pixels[y, x], colour, atol=tolerance, err_msg=f'at {(x, y)}')


@pytest.mark.parametrize('fmt, params, tolerance', [
    ('PNG', {}, 0),
    ('JPEG', {'quality': 95}, 8),
    ('GIF', {}, 0),
    ('BMP', {}, 0),
    ('WEBP', {'lossless': True}, 0),
    ('TIFF', {}, 0),
    ('TIFF', {'compression': 'tiff_lzw'}, 0),
])
def test_decodes_each_format(fmt, params, tolerance):
  rgb = decode_image(_encode(_quadrants(), fmt, **params))
  assert rgb.mode == 'RGB'
  assert rgb.size == (64, 48)
  _assert_quadrants(rgb, tolerance)


def test_gif_uses_first_frame():
  frames = [Image.new('RGB', (16, 16), colour) for colour in (RED, BLUE, GREEN)]
  data = _encode(frames[0], 'GIF', save_all=True, append_images=frames[1:])
  assert Image.open(io.BytesIO(data)).n_frames == 3
  assert np.all(np.asarray(decode_image(data)) == RED)


def test_greyscale_becomes_grey_rgb():
  rgb = decode_image(_encode(Image.new('L', (8, 8), 100), 'PNG'))
  assert np.all(np.asarray(rgb) == 100)


@pytest.mark.parametrize('fmt', ['PNG', 'BMP', 'TIFF'])
def test_one_bit(fmt):
  image = Image.new('1', (16, 8), 0)
  image.paste(1, (8, 0, 16, 8))
  pixels = np.asarray(decode_image(_encode(image, fmt)))
  assert np.all(pixels[:, :8] == BLACK)
  assert np.all(pixels[:, 8:] == WHITE)


def test_rgba_composites_on_white():
  image = Image.new('RGBA', (3, 1))
  image.putpixel((0, 0), (0, 0, 0, 0))  # Transparent black shows as white, not black.
  image.putpixel((1, 0), (255, 0, 0, 255))
  image.putpixel((2, 0), (0, 0, 255, 128))
  for data in (_encode(image, 'PNG'), _encode(image, 'WEBP', lossless=True)):
    pixels = np.asarray(decode_image(data)).astype(int)
    np.testing.assert_array_equal(pixels[0, 0], WHITE)
    np.testing.assert_array_equal(pixels[0, 1], RED)
    np.testing.assert_allclose(pixels[0, 2], (127, 127, 255), atol=1)


def test_rgb_colour_key_transparency_composites_on_white():
  image = Image.new('RGB', (2, 1), BLACK)
  image.putpixel((1, 0), RED)
  pixels = np.asarray(decode_image(_encode(image, 'PNG', transparency=BLACK)))
  np.testing.assert_array_equal(pixels[0], [WHITE, RED])


def test_la_composites_on_white():
  image = Image.new('LA', (2, 1))
  image.putpixel((0, 0), (0, 128))
  image.putpixel((1, 0), (40, 255))
  pixels = np.asarray(decode_image(_encode(image, 'PNG'))).astype(int)
  np.testing.assert_allclose(pixels[0, 0], (127,) * 3, atol=1)
  np.testing.assert_array_equal(pixels[0, 1], (40,) * 3)


@pytest.mark.parametrize('fmt', ['PNG', 'GIF'])
def test_palette_transparency_composites_on_white(fmt):
  image = Image.new('P', (4, 1))
  image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 - 2) * 3)
  image.putpixel((0, 0), 0)  # Palette entry 0 (black) is the transparent one.
  image.paste(1, (1, 0, 4, 1))
  decoded = Image.open(io.BytesIO(_encode(image, fmt, transparency=0)))
  assert decoded.mode == 'P' and 'transparency' in decoded.info
  pixels = np.asarray(decode_image(_encode(image, fmt, transparency=0)))
  np.testing.assert_array_equal(pixels[0, 0], WHITE)
  assert np.all(pixels[0, 1:] == RED)


def test_cmyk_jpeg():
  image = Image.new('CMYK', (16, 8), (0, 0, 0, 0))
  image.paste((255, 0, 0, 0), (8, 0, 16, 8))
  pixels = np.asarray(decode_image(_encode(image, 'JPEG', quality=100))).astype(int)
  np.testing.assert_allclose(pixels[4, 2], WHITE, atol=3)
  np.testing.assert_allclose(pixels[4, 13], (0, 255, 255), atol=3)


@pytest.mark.parametrize('fmt, dtype', [('PNG', np.uint16), ('TIFF', np.uint16),
                                        ('TIFF', np.int32)])
def test_sixteen_bit_scales_to_unit_range(fmt, dtype):
  values = np.array([[0, 257 * 100, 32768, 65535]], dtype=dtype)
  data = _encode(Image.fromarray(values), fmt)
  assert Image.open(io.BytesIO(data)).mode in ('I;16', 'I')
  _, _, pixels = decode_and_resize(data, 1, 4)
  np.testing.assert_allclose(pixels[0, :, 0], [0, 100 / 255, 0.5, 1.0], atol=0.5 / 255)
  assert np.all(pixels[..., 0] == pixels[..., 2])


def _png16(values: np.ndarray, colour_type: int) -> bytes:
  """A 16-bit-per-sample PNG (Pillow cannot write 16-bit RGB): colour type 2 RGB, 4 LA."""
  height, width = values.shape[:2]
  raw = b''.join(b'\x00' + row.astype('>u2').tobytes() for row in values)
  return png(width, height, 16, colour_type, raw)


def test_sixteen_bit_colour_png():
  rgb = np.array([[[0, 32768, 65535], [65535, 65535, 65535]]], dtype=np.uint16)
  _, _, pixels = decode_and_resize(_png16(rgb, 2), 1, 2)
  np.testing.assert_allclose(pixels[0], [[0, 0.5, 1], [1, 1, 1]], atol=1 / 255)
  grey_alpha = np.array([[[0, 32768], [20000, 65535]]], dtype=np.uint16)  # Half-transparent black.
  _, _, pixels = decode_and_resize(_png16(grey_alpha, 4), 1, 2)
  np.testing.assert_allclose(pixels[0], [[0.5] * 3, [20000 / 65535] * 3], atol=1 / 255)


def test_float_pixels_are_refused():
  data = _encode(Image.fromarray(np.zeros((2, 2), np.float32)), 'TIFF')
  with pytest.raises(ValueError, match='mode F'):
    decode_image(data)


def _oriented_jpeg(orientation: int, width=40, height=20) -> bytes:
  """Left half red, right half blue as stored; the EXIF tag says how to show it."""
  image = Image.new('RGB', (width, height), RED)
  image.paste(BLUE, (width // 2, 0, width, height))
  exif = Image.Exif()
  exif[0x0112] = orientation
  return _encode(image, 'JPEG', quality=95, exif=exif)


def test_exif_orientation_is_applied():
  # Orientation 6: shown rotated 90 degrees clockwise, so the stored left (red) ends up on top.
  rgb = decode_image(_oriented_jpeg(6))
  assert rgb.size == (20, 40)
  pixels = np.asarray(rgb).astype(int)
  np.testing.assert_allclose(pixels[10, 10], RED, atol=8)
  np.testing.assert_allclose(pixels[30, 10], BLUE, atol=8)
  height, width, _ = decode_and_resize(_oriented_jpeg(6), 8, 8)
  assert (height, width) == (40, 20)
  assert decode_image(_oriented_jpeg(1)).size == (40, 20)


@pytest.mark.parametrize('orientation', range(1, 9))
def test_every_exif_orientation_matches_pillows(orientation):
  """JPEGs are decoded by libjpeg-turbo and oriented by our table: it must agree with Pillow's."""
  image = Image.new('RGB', (40, 20), RED)
  image.paste(BLUE, (20, 0, 40, 10))
  image.paste(GREEN, (0, 10, 20, 20))
  exif = Image.Exif()
  exif[0x0112] = orientation
  data = _encode(image, 'JPEG', quality=95, exif=exif)
  expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert('RGB'))
  ours = np.asarray(decode_image(data))
  assert ours.shape == expected.shape
  assert np.abs(ours.astype(int) - expected.astype(int)).mean() < 2


@pytest.mark.parametrize('data, error, message', [
    (b'', UnidentifiedImageError, r'not a JPEG.*\(0 bytes'),
    (b'hello, this is plain text\n', UnidentifiedImageError, r"starting b'hello"),
    (b'\xff\xd8\xff\xe0' + b'\x00' * 64, OSError, None),  # A JPEG signature with junk after it.
])
def test_refuses_non_images(data, error, message):
  with pytest.raises(error, match=message):
    decode_image(data)


def test_refuses_other_formats_by_content():
  with pytest.raises(UnidentifiedImageError, match='not a JPEG'):
    decode_image(_encode(Image.new('RGB', (4, 4)), 'PPM'))


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_refuses_truncated(fmt):
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  data = _encode(Image.fromarray(noise), fmt)
  decode_image(data)
  with pytest.raises(OSError):
    decode_image(data[:len(data) * 2 // 3])


def test_decompression_bomb_limit():
  data = _encode(Image.new('RGB', (64, 64)), 'PNG')  # 4096 pixels.
  assert decode_image(data, max_image_pixels=4096).size == (64, 64)
  with pytest.raises(Image.DecompressionBombError, match='4096 pixels, over the limit of 4095'):
    decode_image(data, max_image_pixels=4095)
  assert decode_image(data, max_image_pixels=None).size == (64, 64)


def test_limit_above_pillow_global_is_honoured(monkeypatch):
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # Pillow alone refuses > 2000 pixels.
  data = _encode(Image.new('RGB', (64, 64)), 'PNG')
  with pytest.raises(Image.DecompressionBombError):
    Image.open(io.BytesIO(data))
  assert decode_image(data, max_image_pixels=5000).size == (64, 64)
  assert Image.MAX_IMAGE_PIXELS == 5000
  with pytest.raises(Image.DecompressionBombError, match='limit of 3000'):
    decode_image(data, max_image_pixels=3000)
  assert Image.MAX_IMAGE_PIXELS == 5000  # Only ever raised.
  assert decode_image(data, max_image_pixels=None).size == (64, 64)
  assert Image.MAX_IMAGE_PIXELS is None


def _tf_recipe(data: bytes, height: int, width: int, center_crop_fraction: float = 1.0,
               dct_method: str | None = None) -> np.ndarray:
  """The network's input contract, as TensorFlow states it (TF2 resizes with half-pixel centres)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if dct_method is None:
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
  else:
    image = tf.io.decode_jpeg(data, channels=3, dct_method=dct_method)
  image = tf.image.convert_image_dtype(image, tf.float32)
  if center_crop_fraction < 1:
    image = tf.image.central_crop(image, center_crop_fraction)
  assert IMAGE_INPUT.half_pixel_centers and IMAGE_INPUT.value_range == (0.0, 1.0)
  return tf.image.resize(image, (height, width), IMAGE_INPUT.interpolation,
                         antialias=IMAGE_INPUT.antialias).numpy()


def _sample_cases():
  cases = [(name, (SAMPLES / name).read_bytes()) for name in SAMPLE_NAMES]
  small = Image.open(SAMPLES / 'chelsea.png').convert('RGB').resize((80, 100))
  return cases + [('upscale_100x80.png', _encode(small, 'PNG'))]


def _assert_recipe_parity(ours, reference):
  difference = np.abs(ours - reference)
  assert difference.max() <= 2 / 255 and difference.mean() <= 0.5 / 255, (
      f'max {difference.max() * 255:.2f}/255, mean {difference.mean() * 255:.3f}/255')


@pytest.mark.parametrize('size', [(331, 331), (224, 300)])
@pytest.mark.parametrize('center_crop_fraction', [1.0, 0.875])
def test_resize_matches_tf_on_same_pixels(size, center_crop_fraction):
  """The numpy resize alone, fed TF's own decoded pixels: agreement down to float rounding."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  for name, data in _sample_cases():
    decoded = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    ours = resize_for_model(Image.fromarray(decoded), *size, center_crop_fraction)
    assert ours.dtype == np.float32 and ours.shape == (*size, 3)
    assert 0 <= ours.min() and ours.max() <= 1
    np.testing.assert_allclose(ours, _tf_recipe(data, *size, center_crop_fraction), atol=1e-5,
                               err_msg=name)


@pytest.mark.parametrize('center_crop_fraction', [1.0, 0.875])
def test_matches_tf_recipe(center_crop_fraction):
  """The whole stage against the recipe as TF-Hub users run it, JPEGs included."""
  for name, data in _sample_cases():
    _, _, ours = decode_and_resize(data, 331, 331, center_crop_fraction)
    _assert_recipe_parity(ours, _tf_recipe(data, 331, 331, center_crop_fraction))


def test_jpeg_pixels_equal_tf_decode_jpeg_bit_for_bit():
  """Decoding without TensorFlow changes no pixel: every JPEG variant Pillow writes (qualities,
  chroma subsampling, progressive, greyscale, odd sizes) of the sample photos."""
  variants = jpeg_variants(qualities=(75, 100), subsamplings=(0, 2))
  assert len(variants) > 50
  for name, data in variants.items():
    np.testing.assert_array_equal(our_pixels(data), tf_pixels(data), err_msg=name)


def test_corrupted_jpegs_are_judged_as_tf_judges_them():
  """Cut-short files are refused as TF refuses them; files both accept decode to equal pixels.
  (benchmarks/jpeg_parity.py counts the rare corrupted file only one of the two accepts.)"""
  both_decoded = 0
  for kind, data in corrupted_jpegs(30, seed=1):
    theirs, ours = tf_pixels(data), our_pixels(data)
    if kind.endswith(('cut short', 'both')):
      assert theirs is None and ours is None, kind
    elif theirs is not None and ours is not None:
      both_decoded += 1
      np.testing.assert_array_equal(ours, theirs, err_msg=kind)
  assert both_decoded > 10


def test_pillow_jpeg_decoding_would_miss_the_recipe():
  """Why JPEGs go through libjpeg-turbo's fast DCT: Pillow's accurate DCT is off by far more."""
  data = (SAMPLES / 'hubble_deep_field.jpg').read_bytes()
  pillow = resize_for_model(Image.open(io.BytesIO(data)).convert('RGB'), 331, 331)
  assert np.abs(pillow - _tf_recipe(data, 331, 331)).max() > 2 / 255
  np.testing.assert_allclose(pillow, _tf_recipe(data, 331, 331, dct_method='INTEGER_ACCURATE'),
                             atol=1e-5)


def test_center_crop_keeps_the_centre():
  image = Image.new('RGB', (120, 80), BLUE)
  image.paste(RED, (30, 20, 90, 60))  # The central half in each dimension.
  cropped = resize_for_model(image, 16, 16, center_crop_fraction=0.5)
  np.testing.assert_array_equal(cropped, np.broadcast_to(np.float32(RED) / 255, (16, 16, 3)))
  uncropped = resize_for_model(image, 16, 16)
  np.testing.assert_array_equal(uncropped[0, 0], np.float32(BLUE) / 255)


@pytest.mark.parametrize('fraction', [0, -0.5, 1.5])
def test_center_crop_fraction_is_validated(fraction):
  with pytest.raises(ValueError, match='center_crop_fraction'):
    resize_for_model(Image.new('RGB', (4, 4)), 2, 2, fraction)
  with pytest.raises(ValueError, match='center_crop_fraction'):
    DecodeImages(2, 2, center_crop_fraction=fraction)


def test_jpeg_draft_keeps_size_and_stays_close():
  data = (SAMPLES / 'hubble_deep_field.jpg').read_bytes()
  height, width, exact = decode_and_resize(data, 331, 331)
  draft_height, draft_width, draft = decode_and_resize(data, 331, 331, jpeg_draft=True)
  assert (draft_height, draft_width) == (height, width) == (872, 1000)
  assert draft.shape == exact.shape and draft.dtype == np.float32
  assert not np.array_equal(draft, exact)  # The reduced decode did happen...
  assert np.abs(draft - exact).mean() < 0.05  # ...and still shows the same picture.


def test_jpeg_draft_with_rotation_reports_upright_full_size():
  data = _oriented_jpeg(6, width=800, height=400)
  height, width, pixels = decode_and_resize(data, 50, 100, jpeg_draft=True)
  assert (height, width) == (800, 400)
  assert np.abs(pixels - decode_and_resize(data, 50, 100)[2]).max() < 0.1
  assert pixels[5, 50, 0] > 0.9 and pixels[45, 50, 2] > 0.9  # Red on top, blue below.


def _file(uri, data):
  return ImageFile(uri, len(data), 1_700_000_000_000_000, data)


def test_decode_images_transform():
  png = _encode(_quadrants(), 'PNG')
  jpeg = (SAMPLES / 'rocket.jpg').read_bytes()
  bomb = _encode(Image.new('RGB', (1000, 1000)), 'PNG')
  inputs = [
      _file('gs://b/quadrants.png', png),
      _file('gs://b/really_a_png.jpg', png),  # Names do not decide the format; bytes do.
      _file('gs://b/rocket.jpg', jpeg),
      _file('gs://b/really_a_jpeg.png', jpeg),
      _file('gs://b/empty.jpg', b''),
      _file('gs://b/notes.txt', b'not an image'),
      _file('gs://b/truncated.jpg', jpeg[:len(jpeg) // 2]),
      _file('gs://b/bomb.png', bomb),
  ]

  def summary(decoded: DecodedImage):
    assert isinstance(decoded, DecodedImage)
    pixels = decoded.pixels
    in_range = bool(0 <= pixels.min() and pixels.max() <= 1)
    return (decoded.uri, decoded.sha256, decoded.height, decoded.width, decoded.size_bytes,
            decoded.last_modified, pixels.shape, str(pixels.dtype), in_range)

  def expected(uri, data, height, width):
    return (uri, hashlib.sha256(data).hexdigest(), height, width, len(data),
            1_700_000_000_000_000, (20, 30, 3), 'float32', True)

  pipeline = test_pipeline.TestPipeline(runner='DirectRunner')
  result = (pipeline
            | beam.Create(inputs)
            | DecodeImages(20, 30, max_image_pixels=640 * 427))
  assert_that(result.decoded | beam.Map(summary),
              equal_to([expected('gs://b/quadrants.png', png, 48, 64),
                        expected('gs://b/really_a_png.jpg', png, 48, 64),
                        expected('gs://b/rocket.jpg', jpeg, 427, 640),
                        expected('gs://b/really_a_jpeg.png', jpeg, 427, 640)]),
              label='decoded')
  # A decode failure keeps what an incremental run needs to know the file unchanged.
  assert_that(result[FAILURES_TAG] | beam.Map(lambda f: (type(f), f.uri, f.stage, f.error,
                                                         f.sha256 is not None, f.size_bytes)),
              equal_to([(Failure, 'gs://b/empty.jpg', DECODE, 'UnidentifiedImageError', True, 0),
                        (Failure, 'gs://b/notes.txt', DECODE, 'UnidentifiedImageError', True, 12),
                        (Failure, 'gs://b/truncated.jpg', DECODE, 'OSError', True,
                         len(jpeg) // 2),
                        (Failure, 'gs://b/bomb.png', DECODE, 'DecompressionBombError', True,
                         len(bomb))]),
              label='failures')
  run = pipeline.run()
  run.wait_until_finish()

  def metric(name):
    [counter] = run.metrics().query(MetricsFilter().with_namespace('decode').with_name(name))[
        'counters' if name != 'decode_resize_ms' else 'distributions']
    return counter.committed

  assert metric('decoded') == 4
  assert metric('failed') == 4
  assert metric('decode_resize_ms').count == 4


def test_a_decompression_bomb_is_a_decode_failure_without_pillows_warning(monkeypatch):
  """Pillow warns on a file over its global limit before our own check refuses it; the run's log
  must show the failure and its reason, not the warning as well (26.9)."""
  import warnings
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', DEFAULT_MAX_IMAGE_PIXELS)  # as in a new worker
  bomb = png_declaring(10_000, 10_000)  # 1e8 pixels: over the limit, under twice it
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('default')  # what a worker shows: each warning once
    pipeline = test_pipeline.TestPipeline(runner='DirectRunner')
    result = pipeline | beam.Create([_file('gs://b/bomb.png', bomb)]) | DecodeImages(20, 30)
    assert_that(result[FAILURES_TAG] | beam.Map(lambda f: (f.uri, f.stage, f.error, f.message)),
                equal_to([('gs://b/bomb.png', DECODE, 'DecompressionBombError',
                           'image is 10000x10000 = 100000000 pixels, over the limit of 89478485 '
                           'pixels (max_image_pixels)')]))
    pipeline.run().wait_until_finish()
  assert [str(w.message) for w in caught if w.category is Image.DecompressionBombWarning] == []
