"""Stage 2: decode each image's bytes and resize it to the model's input.

Pixels follow the network's input contract (`IMAGE_INPUT`, stated in pnasnet/network.py), the
recipe TF-Hub users apply to feed image modules, so embeddings from this pipeline are comparable
with theirs: `tf.io.decode_image` -> `tf.image.convert_image_dtype(tf.float32)` ->
`tf.image.resize(size, 'bilinear')`. Pillow identifies and decodes (it reads more formats and
modes than `tf.io.decode_image`, and lets us bound memory before decoding), and numpy reproduces
TF's resize. RGB and grayscale JPEGs alone are decoded by libjpeg-turbo through `simplejpeg`, with
the settings `tf.io.decode_jpeg` uses (fast integer DCT, fancy upsampling): Pillow only offers
libjpeg's accurate DCT, and the two differ by up to 14/255 on the sample photos (Pillow's result
equals TF's 'INTEGER_ACCURATE' exactly), while simplejpeg's pixels equal TF's bit for bit
(tests/test_decode.py compares them on every JPEG variant Pillow writes).

Decoding runs no TensorFlow op (TensorFlow is imported with the input contract, which initialises
no device): on a GPU worker the SDK processes that only decode must not initialise the GPU (each
would hold a CUDA context and, without memory growth, map nearly all of the GPU's memory, leaving
the model's process to run out). tests/test_gpu_processes.py checks it in a fresh process.
"""

import functools
import hashlib
import io
import math
import threading
import time
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from models.handles import IMAGE_INPUT
from transforms import quiet_logs
from transforms.failures import DECODE, FAILURES_TAG, Failure
from transforms.read import ImageFile

DEFAULT_MAX_IMAGE_PIXELS = 89478485  # Pillow's own default: 1024 * 1024 * 1024 // 4 // 3.

# Pillow can parse dozens of other formats (and hands EPS to Ghostscript); the input is untrusted
# files, so only the formats we support and test get a parser. (The JPEG parser also reads the
# multi-picture JPEGs many cameras write, which Pillow reports as MPO.)
FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP', 'WEBP', 'TIFF')

_SIXTEEN_BIT_MODES = frozenset({'I;16', 'I;16L', 'I;16B', 'I;16N', 'I'})
_ALPHA_MODES = frozenset({'RGBA', 'RGBa', 'LA', 'PA'})
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width/height.
_WHITE = (255, 255, 255, 255)
# Markers: in entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so an
# end-of-image marker after the last start-of-scan marker means the file was not cut short.
_JPEG_SCAN_START, _JPEG_END = b'\xff\xda', b'\xff\xd9'

_pillow_limit_lock = threading.Lock()


class DecodedImage(NamedTuple):
  uri: str
  sha256: str  # of the file's bytes, so duplicates and provenance can be traced.
  height: int  # of the full image, upright (after EXIF orientation), before resizing.
  width: int
  size_bytes: int
  last_modified: int | None  # microseconds since the Unix epoch, from the file listing.
  pixels: np.ndarray  # float32 [H, W, 3] in [0, 1] at the model's input size.
  content_id: str | None = None  # the store's identity of the bytes, from the file listing.
  byte_offset: int | None = None  # a shard member's bytes in its shard (transforms/read.ImageFile)
  byte_length: int | None = None


def _raise_pillow_limit(max_image_pixels: int | None) -> None:
  """Lets Pillow's process-wide check admit images up to `max_image_pixels`.

  Pillow refuses anything over twice its global `Image.MAX_IMAGE_PIXELS`, so a larger per-call
  limit needs the global raised. Temporarily setting it per call would race with other threads
  decoding; instead it is only ever raised, under a lock, and each call enforces its own limit in
  `_open`. The global thus stays the largest limit anyone asked for.
  """
  current = Image.MAX_IMAGE_PIXELS
  if current is None or (max_image_pixels is not None and max_image_pixels <= current):
    return
  with _pillow_limit_lock:
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and (max_image_pixels is None or max_image_pixels > current):
      Image.MAX_IMAGE_PIXELS = max_image_pixels


def _open(data: bytes, max_image_pixels: int | None) -> Image.Image:
  """Identifies the image from its content (never its name) and refuses it before decoding if
  it declares more pixels than `max_image_pixels` (None: no limit), with its own reason (so
  Pillow's warning on the way is dropped)."""
  quiet_logs.ignore_pillow_bomb_warnings()
  _raise_pillow_limit(max_image_pixels)
  try:
    image = Image.open(io.BytesIO(data), formats=FORMATS)
  except UnidentifiedImageError as e:
    raise UnidentifiedImageError(
        f'not a {", ".join(FORMATS)} image ({len(data)} bytes, starting {data[:16]!r})') from e
  pixels = image.width * image.height
  if max_image_pixels is not None and pixels > max_image_pixels:
    raise Image.DecompressionBombError(
        f'image is {image.width}x{image.height} = {pixels} pixels, over the limit of '
        f'{max_image_pixels} pixels (max_image_pixels)')
  return image


def _sixteen_to_eight_bits(image: Image.Image) -> Image.Image:
  """Maps 0..65535 onto 0..255 by rounding; Pillow's own convert clips everything above 255."""
  values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
  return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                   8: Image.Transpose.ROTATE_90}


def _jpeg_pixels(data: bytes) -> np.ndarray:
  """libjpeg-turbo with `tf.io.decode_jpeg`'s settings and its tolerance: like TF, it accepts
  data that libjpeg only warns about (corrupt entropy-coded bytes, which many cameras write) but
  refuses a file that ends before its end-of-image marker (truncated)."""
  def decode(strict: bool) -> np.ndarray:
    return simplejpeg.decode_jpeg(data, colorspace='RGB', fastdct=True, fastupsample=False,
                                  strict=strict)
  try:
    return decode(strict=True)
  except ValueError as e:  # libjpeg's errors, and (strict) its warnings
    truncated = ('Premature end of JPEG file' in str(e)
                 or data.find(_JPEG_END, data.rfind(_JPEG_SCAN_START)) < 0)
    if truncated:
      raise OSError(f'truncated JPEG: {e}') from e
    try:
      return decode(strict=False)
    except ValueError as again:
      raise OSError(f'corrupt JPEG: {again}') from again


def _decode_jpeg_as_tf(image: Image.Image, data: bytes) -> Image.Image:
  """The recipe's own JPEG decoding, then the EXIF orientation Pillow read."""
  decoded = Image.fromarray(_jpeg_pixels(data))
  method = _EXIF_TRANSPOSE.get(image.getexif().get(ExifTags.Base.Orientation))
  return decoded.transpose(method) if method is not None else decoded


def _to_rgb(image: Image.Image, data: bytes | None = None) -> Image.Image:
  """Decodes (the first frame), applies EXIF orientation and converts to 8-bit RGB.

  Transparent pixels are composited on white rather than having their alpha dropped: the colour
  stored under a fully transparent pixel is arbitrary (often black, sometimes leftover content)
  and invisible to anyone viewing the image, so dropping alpha would let it change the embedding.
  White is how such images are shown on a page. `tf.io.decode_image(channels=3)` drops alpha, so
  for transparent images only, pixels deliberately differ from the TF recipe.

  With the file's `data`, RGB and grayscale JPEGs are decoded as the TF recipe decodes them.
  """
  if data is not None and image.format in ('JPEG', 'MPO') and image.mode in ('RGB', 'L'):
    return _decode_jpeg_as_tf(image, data)
  image.load()  # Decode now, so truncated data fails here with Pillow's error.
  ImageOps.exif_transpose(image, in_place=True)
  if image.mode in _SIXTEEN_BIT_MODES:  # 32-bit 'I' declares no range; 16-bit is assumed.
    image = _sixteen_to_eight_bits(image)
  elif image.mode == 'F':
    raise ValueError('floating-point pixels (mode F) have no defined range to map to [0, 1]')
  if image.mode in _ALPHA_MODES or 'transparency' in image.info:
    white = Image.new('RGBA', image.size, _WHITE)
    return Image.alpha_composite(white, image.convert('RGBA')).convert('RGB')
  return image if image.mode == 'RGB' else image.convert('RGB')


def decode_image(data: bytes,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
  """Decodes an image file's bytes into an upright 8-bit RGB image.

  Raises (all are dead-lettered by DecodeImages): UnidentifiedImageError for empty, non-image or
  unsupported-format bytes; Image.DecompressionBombError above `max_image_pixels`; OSError and
  friends for truncated or corrupt data; ValueError for modes with no RGB meaning.
  """
  return _to_rgb(_open(data, max_image_pixels), data)


def _check_resize_args(height: int, width: int, center_crop_fraction: float) -> None:
  if height < 1 or width < 1:
    raise ValueError(f'height and width must be positive, got {height}x{width}')
  if not 0 < center_crop_fraction <= 1:
    raise ValueError(f'center_crop_fraction must be in (0, 1], got {center_crop_fraction}')


@functools.lru_cache(maxsize=64)
def _bilinear_taps(in_size: int, out_size: int,
                   channels: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per output index: the two source indices and the weight of the second, computed in float32
  exactly as TF's ResizeBilinear does with half-pixel centers. With channels > 1 they index a row
  whose pixels' channels are interleaved, so one gather serves all channels."""
  scale = np.float32(in_size) / np.float32(out_size)
  source = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(source)
  lower = np.maximum(floor, 0).astype(np.intp)
  upper = np.minimum(np.ceil(source), in_size - 1).astype(np.intp)
  channel = np.arange(channels)
  return ((lower[:, np.newaxis] * channels + channel).ravel(),
          (upper[:, np.newaxis] * channels + channel).ravel(), np.repeat(source - floor, channels))


def resize_for_model(image: Image.Image,
                     height: int,
                     width: int,
                     center_crop_fraction: float = IMAGE_INPUT.crop_fraction) -> np.ndarray:
  """Crops the central fraction (as tf.image.central_crop) and resizes as tf.image.resize does
  by default (bilinear, half-pixel centers, no antialiasing), to float32 [height, width, 3] in
  [0, 1].

  Pillow's own resize antialiases when downscaling, which differs from the TF recipe by far more
  than rounding on large downscales, hence the numpy reimplementation.
  """
  _check_resize_args(height, width, center_crop_fraction)
  if image.mode != 'RGB':
    raise ValueError(f'expected an RGB image, got mode {image.mode}')
  pixels = np.asarray(image)
  if center_crop_fraction < 1:
    in_height, in_width = pixels.shape[:2]
    first_row = int((in_height - in_height * center_crop_fraction) / 2)
    first_column = int((in_width - in_width * center_crop_fraction) / 2)
    pixels = pixels[first_row:in_height - first_row, first_column:in_width - first_column]
  y_lower, y_upper, y_lerp = _bilinear_taps(pixels.shape[0], height)
  x_lower, x_upper, x_lerp = _bilinear_taps(pixels.shape[1], width, channels=3)

  def along_x(rows: np.ndarray) -> np.ndarray:  # In TF's order: x first, on the two rows.
    rows = rows.reshape(height, -1)
    left = rows[:, x_lower].astype(np.float32)
    right = rows[:, x_upper].astype(np.float32)
    right -= left
    right *= x_lerp
    return np.add(left, right, out=left)

  top = along_x(pixels[y_lower])
  bottom = along_x(pixels[y_upper])
  bottom -= top
  bottom *= y_lerp[:, np.newaxis]
  top += bottom
  top *= np.float32(1 / 255)
  return top.reshape(height, width, 3)


def decode_and_resize(data: bytes,
                      height: int,
                      width: int,
                      center_crop_fraction: float = IMAGE_INPUT.crop_fraction,
                      max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                      jpeg_draft: bool = False) -> tuple[int, int, np.ndarray]:
  """Returns the upright full-size (height, width) and the model's input pixels.

  `jpeg_draft` lets libjpeg decode JPEGs at 1/2, 1/4 or 1/8 scale (still no smaller than the
  crop needs), which is much faster for photos far larger than the model's input but averages
  pixels in the DCT domain, so the result no longer matches the TF recipe. The reported size is
  still that of the full image, so it does not depend on the flag.
  """
  image = _open(data, max_image_pixels)
  full_width, full_height = image.size
  if jpeg_draft:
    if image.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSING_ORIENTATIONS:
      full_width, full_height = full_height, full_width
      needed = (height, width)
    else:
      needed = (width, height)
    image.draft('RGB', tuple(math.ceil(n / center_crop_fraction) for n in needed))
  rgb = _to_rgb(image, None if jpeg_draft else data)
  if not jpeg_draft:
    full_width, full_height = rgb.size
  return full_height, full_width, resize_for_model(rgb, height, width, center_crop_fraction)


class _DecodeFn(beam.DoFn):

  def __init__(self, height, width, center_crop_fraction, max_image_pixels, jpeg_draft):
    self._options = dict(height=height, width=width, center_crop_fraction=center_crop_fraction,
                         max_image_pixels=max_image_pixels, jpeg_draft=jpeg_draft)
    self._decoded = beam.metrics.Metrics.counter('decode', 'decoded')
    self._failed = beam.metrics.Metrics.counter('decode', 'failed')
    self._milliseconds = beam.metrics.Metrics.distribution('decode', 'decode_resize_ms')

  def process(self, image_file: ImageFile):
    start = time.perf_counter()
    sha256 = hashlib.sha256(image_file.data).hexdigest()
    try:
      height, width, pixels = decode_and_resize(image_file.data, **self._options)
    except Exception as e:  # pylint: disable=broad-except; any bad file is dead-lettered.
      self._failed.inc()
      yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure.from_exception(
          image_file.uri, DECODE, e, size_bytes=image_file.size_bytes,
          last_modified=image_file.last_modified, sha256=sha256,
          content_id=image_file.content_id))
      return
    self._milliseconds.update(round((time.perf_counter() - start) * 1000))  # Decoded images only.
    self._decoded.inc()
    yield DecodedImage(image_file.uri, sha256, height, width, image_file.size_bytes,
                       image_file.last_modified, pixels, image_file.content_id,
                       image_file.byte_offset, image_file.byte_length)


class DecodeImages(beam.PTransform):
  """ImageFile -> DecodedImage (main output, tag 'decoded'), or Failure(stage 'decode') on the
  FAILURES_TAG output; every input ends in exactly one of the two."""

  def __init__(self,
               height: int,
               width: int,
               center_crop_fraction: float = IMAGE_INPUT.crop_fraction,
               max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
               jpeg_draft: bool = False):
    super().__init__()
    _check_resize_args(height, width, center_crop_fraction)  # Fail at construction, not per image.
    if max_image_pixels is not None and max_image_pixels < 1:
      raise ValueError(f'max_image_pixels must be positive or None, got {max_image_pixels}')
    self._fn = _DecodeFn(height, width, center_crop_fraction, max_image_pixels, jpeg_draft)

  def expand(self, images):
    return images | 'Decode' >> beam.ParDo(self._fn).with_outputs(FAILURES_TAG, main='decoded')
