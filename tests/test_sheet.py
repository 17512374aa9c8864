"""embeddings.sheet: the labels of contact sheets, drawn as a person reads them."""

import unicodedata

import numpy as np

from embeddings import sheet


def _label_pixels(text):
  """The first label line of a tile, as drawn on a sheet."""
  image = sheet.draw_sheet([[sheet.Tile(None, [text])]], 1)
  top = sheet.PADDING + sheet.THUMBNAIL + 4
  return np.asarray(image.convert('L'))[top:top + sheet.LINE_HEIGHT]


def test_japanese_and_emoji_in_a_name_are_drawn_not_as_boxes():
  """Every character is drawn with a font that has it: none looks like the box of a character
  no font has, and no two look alike (boxes would)."""
  box = _label_pixels(sheet.NO_GLYPH)
  name = '東京タワー写真한국中文🗼📷😀'
  drawn = [_label_pixels(char).tobytes() for char in name]
  assert [c for c, pixels in zip(name, drawn) if pixels == box.tobytes()] == []
  assert len(set(drawn)) == len(name)
  mixed = _label_pixels('IMG_東京🗼.jpg')
  assert (mixed < 128).any(axis=0).sum() > (_label_pixels('IMG_.jpg') < 128).any(axis=0).sum()


def test_a_long_name_keeps_its_end_and_a_mark_stays_on_its_letter():
  """`…/2019/IMG_1234.jpg` shortens to `…G_1234.jpg`, not to the folder and an ellipsis."""
  font = sheet._font()  # pylint: disable=protected-access
  uri = 'gs://photos/2019/' + 'summer_holiday_in_the_mountains_' * 3 + 'IMG_1234.jpg'
  for name in (sheet.short_name(uri), '写真' * 20 + '_0042.jpg', 'cafe\u0301' * 30 + '.jpg',
               'e\u0301' * 40 + '.png'):
    [line] = sheet.fitted_lines(sheet.Tile(None, [name]))
    assert line.startswith('…') and name.endswith(line[1:]), (name, line)
    assert font.getlength(line) <= sheet.THUMBNAIL
    assert not unicodedata.combining(line[1])
