"""Contact sheets: thumbnails with short labels on a grid, as a PNG to look at."""

import io
import math
import os
from typing import List, NamedTuple, Optional, Sequence, Union

from PIL import Image, ImageDraw, ImageFont, ImageOps

import storage

THUMBNAIL = 192  # pixels, the longer side
PADDING = 8
LINE_HEIGHT = 17
LABEL_LINES = 4
FONT_SIZE = 13
BACKGROUND = (255, 255, 255)
HIGHLIGHT = (30, 100, 220)  # the frame of a query or a kept image
TEXT = (20, 20, 20)
PLACEHOLDER = (225, 225, 225)
CELL_WIDTH = THUMBNAIL + 2 * PADDING
CELL_HEIGHT = THUMBNAIL + 2 * PADDING + LABEL_LINES * LINE_HEIGHT


class Label(NamedTuple):
  """A label line of words kept whole, then a file name shortened in its middle to fit."""
  words: str
  name: str = ''


class Tile(NamedTuple):
  image: Optional[Image.Image]  # None: drawn as a grey square saying the file is unreadable
  # Up to LABEL_LINES: a str is a name, shortened in its middle to the tile's width; a Label
  # keeps its words and shortens its name.
  lines: Sequence[Union[str, Label]]
  highlight: bool = False


def thumbnail(data: Optional[bytes]) -> Optional[Image.Image]:
  """An upright RGB thumbnail, or None for bytes Pillow cannot show."""
  if data is None:
    return None
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.draft('RGB', (THUMBNAIL, THUMBNAIL))  # JPEGs decode at reduced size: fast
      image = ImageOps.exif_transpose(image)
      if image.mode.startswith('I'):  # 16-bit grey (or 32-bit, taken as 16) to 8 bits
        image = image.convert('I').point(lambda value: value / 257).convert('L')
      if image.mode in ('RGBA', 'LA', 'PA', 'P'):
        image = Image.alpha_composite(Image.new('RGBA', image.size, BACKGROUND + (255,)),
                                      image.convert('RGBA'))
      image = image.convert('RGB')
      image.thumbnail((THUMBNAIL, THUMBNAIL))
      return image
  except Exception:  # pylint: disable=broad-except; a sheet shows what it can
    return None


def thumbnail_of(uri: str) -> Optional[Image.Image]:
  try:
    return thumbnail(storage.read_bytes(uri))
  except Exception:  # pylint: disable=broad-except; moved or deleted since the run
    return None


def _font() -> ImageFont.FreeTypeFont:
  """Noto Sans (Latin, Greek, Cyrillic, Vietnamese, Devanagari), shipped by fontpkg-noto-sans:
  file names in those scripts are drawn as they are, not as boxes."""
  import fontpkg
  return ImageFont.truetype(str(fontpkg.path('Noto Sans')), FONT_SIZE)


def short_name(uri: str) -> str:
  """The file name and its folder: what tells two `inside.png` apart on a sheet."""
  folder = storage.basename(storage.dirname(uri)) if '/' in uri.rstrip('/') else ''
  return f'{folder}/{storage.basename(uri)}' if folder else storage.basename(uri)


def _fit(text: str, font, width: float) -> str:
  """The text, its middle replaced by an ellipsis if too wide (file names differ at both ends)."""
  if font.getlength(text) <= width:
    return text
  keep = len(text)
  while keep > 1:
    keep -= 1
    shortened = text[:keep // 2] + '…' + text[len(text) - (keep - keep // 2):]
    if font.getlength(shortened) <= width:
      return shortened
  return '…'


def _fit_label(line: Union[str, Label], font, width: int) -> str:
  if isinstance(line, str):
    return _fit(line, font, width)
  words = line.words
  while words and font.getlength(words + ('…' if words != line.words else '')) > width:
    words = words[:-1]  # words too wide for any name: cut at their end
  if words != line.words:
    return words + '…'
  return words + _fit(line.name, font, width - font.getlength(words)) if line.name else words


def fitted_lines(tile: Tile, font=None) -> List[str]:
  """The label lines as drawn on the tile."""
  font = font or _font()
  return [_fit_label(line, font, THUMBNAIL) for line in tile.lines[:LABEL_LINES]]


def _draw_tile(sheet: Image.Image, draw: ImageDraw.ImageDraw, tile: Tile, left: int, top: int,
               font) -> None:
  box_left, box_top = left + PADDING, top + PADDING
  if tile.image is None:
    draw.rectangle([box_left, box_top, box_left + THUMBNAIL - 1, box_top + THUMBNAIL - 1],
                   fill=PLACEHOLDER)
    draw.text((box_left + THUMBNAIL // 2, box_top + THUMBNAIL // 2), 'unreadable', fill=TEXT,
              font=font, anchor='mm')
  else:
    offset = ((THUMBNAIL - tile.image.width) // 2, (THUMBNAIL - tile.image.height) // 2)
    sheet.paste(tile.image, (box_left + offset[0], box_top + offset[1]))
  if tile.highlight:
    draw.rectangle([left + 2, top + 2, left + CELL_WIDTH - 3, top + CELL_HEIGHT - 3],
                   outline=HIGHLIGHT, width=3)
  for number, line in enumerate(fitted_lines(tile, font)):
    draw.text((box_left, box_top + THUMBNAIL + 4 + number * LINE_HEIGHT), line, fill=TEXT,
              font=font)


def balanced_columns(tiles: int, most: int) -> int:
  """Columns for `tiles` in as few rows as `most` columns allow, the rows about equally full."""
  rows = max(1, math.ceil(tiles / most))
  return max(1, math.ceil(tiles / rows))


def draw_sheet(groups: Sequence[Sequence[Tile]], columns: int) -> Image.Image:
  """Each group starts a new row and wraps after `columns` tiles."""
  rows: List[Sequence[Tile]] = [group[i:i + columns] for group in groups
                                for i in range(0, len(group), columns)]
  sheet = Image.new('RGB', (columns * CELL_WIDTH, max(1, len(rows)) * CELL_HEIGHT), BACKGROUND)
  draw = ImageDraw.Draw(sheet)
  font = _font()
  for row_number, row in enumerate(rows):
    for column, tile in enumerate(row):
      _draw_tile(sheet, draw, tile, column * CELL_WIDTH, row_number * CELL_HEIGHT, font)
  return sheet


def output_problem(option: str, path: Optional[str]) -> Optional[str]:
  """Why a local output file (a sheet, a CSV) cannot be written, to say before any work."""
  if path is None or storage.is_remote(path):
    return None
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    return f'{option} {path} is a folder: give a file name'
  if not os.path.isdir(folder):
    return f'{option} {path}: the folder {folder} does not exist; create it first'
  if not os.access(folder, os.W_OK):
    return f'{option} {path}: the folder {folder} is not writable'
  return None


def save_png(sheet: Image.Image, path: str) -> None:
  buffer = io.BytesIO()
  sheet.save(buffer, format='PNG', optimize=True)
  storage.write_bytes(path, buffer.getvalue())
