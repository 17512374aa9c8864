"""Contact sheets: thumbnails with short labels on a grid, as a PNG to look at."""

import functools
import io
import math
import os
import re
import unicodedata
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from PIL import Image, ImageDraw, ImageFont, ImageOps

import storage
from storage.members import read_image_bytes

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
# The label fonts' files (manimgx-fonts, manimgx-fonts-cjk): variable fonts, drawn at REGULAR.
LATIN, SYMBOLS, EMOJI = 'NotoSans[wght].ttf', 'NotoSansSymbols[wght].ttf', 'NotoEmoji[wght].ttf'
CJK = 'NotoSansCJK-VF.otf.ttc'  # its first face is Japanese (Chinese and Korean in JP forms)
REGULAR = 400  # the weight axis' value: the CJK font's default is Thin
NO_GLYPH = '\U0010fffd'  # a private-use character no font has: drawn as the font's .notdef


class Label(NamedTuple):
  """A label line of words kept whole, then a file name shortened at its start to fit."""
  words: str
  name: str = ''


class Tile(NamedTuple):
  image: Optional[Image.Image]  # None: drawn as a grey square saying the file is unreadable
  # Up to LABEL_LINES: a str is a name, shortened at its start to the tile's width; a Label
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
    return thumbnail(read_image_bytes(uri))
  except Exception:  # pylint: disable=broad-except; moved or deleted since the run
    return None


def _joins(char: str) -> bool:
  """A combining mark, variation selector, joiner or skin tone: part of the character before."""
  return unicodedata.category(char) in ('Mn', 'Me', 'Cf') or '\U0001f3fb' <= char <= '\U0001f3ff'


class LabelFont:
  """Measures and draws label text run by run, each run of characters in the first font that has
  their glyphs: a file name in Japanese or with an emoji is drawn as it is, not as boxes."""

  def __init__(self, paths: Sequence[str]):
    self.fonts = [ImageFont.truetype(path, FONT_SIZE) for path in paths]
    for font in self.fonts:
      font.set_variation_by_axes([REGULAR])
    # The same faces laid out a character at a time: a character the face lacks is .notdef.
    self._probes = [ImageFont.truetype(path, FONT_SIZE, layout_engine=ImageFont.Layout.BASIC)
                    for path in paths]
    self._notdef = [self._picture(probe, NO_GLYPH) for probe in self._probes]
    self._has: Dict[Tuple[int, str], bool] = {}

  @staticmethod
  def _picture(probe: ImageFont.FreeTypeFont, char: str) -> bytes:
    image = Image.new('L', (3 * FONT_SIZE, 2 * FONT_SIZE))
    ImageDraw.Draw(image).text((0, 0), char, fill=255, font=probe)
    return image.tobytes()

  def has_glyph(self, position: int, char: str) -> bool:
    """Whether the font at `position` draws `char` as something other than its .notdef box."""
    if (position, char) not in self._has:
      self._has[position, char] = (self._picture(self._probes[position], char)
                                   != self._notdef[position])
    return self._has[position, char]

  def runs(self, text: str) -> List[Tuple[ImageFont.FreeTypeFont, str]]:
    """(font, characters) in order. A mark or joiner goes with the character before it, and is
    left out where that font lacks it; a character no font has is Noto Sans's box."""
    runs: List[List] = []
    for char in text:
      if _joins(char):
        if runs and self.has_glyph(runs[-1][0], char):
          runs[-1][1] += char
        continue
      position = next((p for p in range(len(self.fonts)) if self.has_glyph(p, char)), 0)
      if runs and runs[-1][0] == position:
        runs[-1][1] += char
      else:
        runs.append([position, char])
    return [(self.fonts[position], chars) for position, chars in runs]

  def getlength(self, text: str) -> float:
    return sum(font.getlength(chars) for font, chars in self.runs(text))

  def draw(self, draw: ImageDraw.ImageDraw, left: int, top: int, text: str) -> None:
    """The runs side by side on one baseline (the faces' ascents differ)."""
    baseline = top + self.fonts[0].getmetrics()[0]
    for font, chars in self.runs(text):
      draw.text((left, baseline), chars, fill=TEXT, font=font, anchor='ls')
      left += font.getlength(chars)


@functools.lru_cache(maxsize=None)
def _font() -> LabelFont:
  """Noto Sans, then Noto Sans CJK, Noto Sans of other scripts (Arabic to Thai), Noto Sans
  Symbols and Noto Emoji (one colour, like the text), all shipped by manimgx-fonts and
  manimgx-fonts-cjk."""
  import manimgx_fonts
  import manimgx_fonts_cjk
  folder = os.path.dirname(manimgx_fonts.__file__)
  scripts = sorted(name for name in os.listdir(folder)
                   if re.fullmatch(r'NotoSans[A-Z]\w+\[wght\]\.ttf', name) and name != SYMBOLS)
  cjk = os.path.join(os.path.dirname(manimgx_fonts_cjk.__file__), CJK)
  return LabelFont([os.path.join(folder, LATIN), cjk] +
                   [os.path.join(folder, name) for name in scripts + [SYMBOLS, EMOJI]])


def short_name(uri: str) -> str:
  """The file name and its folder: what tells two `inside.png` apart on a sheet."""
  folder = storage.basename(storage.dirname(uri)) if '/' in uri.rstrip('/') else ''
  return f'{folder}/{storage.basename(uri)}' if folder else storage.basename(uri)


def _fit(text: str, font: LabelFont, width: float) -> str:
  """The text, its start replaced by an ellipsis if too wide: a file name's end (its number and
  extension) is what tells it apart, more than its folder."""
  if font.getlength(text) <= width:
    return text
  for start in range(1, len(text)):
    shortened = '…' + text[start:]
    if not _joins(text[start]) and font.getlength(shortened) <= width:
      return shortened
  return '…'


def _fit_label(line: Union[str, Label], font: LabelFont, width: int) -> str:
  if isinstance(line, str):
    return _fit(line, font, width)
  words = line.words
  while words and font.getlength(words + ('…' if words != line.words else '')) > width:
    words = words[:-1]  # words too wide for any name: cut at their end
  if words != line.words:
    return words + '…'
  return words + _fit(line.name, font, width - font.getlength(words)) if line.name else words


def fitted_lines(tile: Tile, font: Optional[LabelFont] = None) -> List[str]:
  """The label lines as drawn on the tile."""
  font = font or _font()
  return [_fit_label(line, font, THUMBNAIL) for line in tile.lines[:LABEL_LINES]]


def _draw_tile(sheet: Image.Image, draw: ImageDraw.ImageDraw, tile: Tile, left: int, top: int,
               font: LabelFont) -> None:
  box_left, box_top = left + PADDING, top + PADDING
  if tile.image is None:
    draw.rectangle([box_left, box_top, box_left + THUMBNAIL - 1, box_top + THUMBNAIL - 1],
                   fill=PLACEHOLDER)
    draw.text((box_left + THUMBNAIL // 2, box_top + THUMBNAIL // 2), 'unreadable', fill=TEXT,
              font=font.fonts[0], anchor='mm')
  else:
    offset = ((THUMBNAIL - tile.image.width) // 2, (THUMBNAIL - tile.image.height) // 2)
    sheet.paste(tile.image, (box_left + offset[0], box_top + offset[1]))
  if tile.highlight:
    draw.rectangle([left + 2, top + 2, left + CELL_WIDTH - 3, top + CELL_HEIGHT - 3],
                   outline=HIGHLIGHT, width=3)
  for number, line in enumerate(fitted_lines(tile, font)):
    font.draw(draw, box_left, box_top + THUMBNAIL + 4 + number * LINE_HEIGHT, line)


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
