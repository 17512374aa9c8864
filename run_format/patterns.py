"""The syntax of the `input` patterns a summary records (what `--input` takes), shared by the
listing that matches them and the night that decides which held files they cover."""

import re

GLOB_CHARACTERS = '*?['


def first_glob(pattern: str) -> int:
  """Where the first unescaped glob character is; the length when there is none."""
  escaped = False
  for position, character in enumerate(pattern):
    if escaped:
      escaped = False
    elif character == '\\':
      escaped = True
    elif character in GLOB_CHARACTERS:
      return position
  return len(pattern)


def has_glob(pattern: str) -> bool:
  return first_glob(pattern) < len(pattern)


def unescape(pattern: str) -> str:
  return re.sub(r'\\(.)', r'\1', pattern)
