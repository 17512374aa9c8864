"""PNG files written chunk by chunk: what Pillow cannot write (16-bit colour) or would not
(a header declaring far more pixels than the file holds)."""

import struct
import zlib


def png(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
  """`raw`: the filtered scanlines, compressed into one IDAT chunk."""

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))

  header = struct.pack('>IIBBBBB', width, height, bit_depth, colour_type, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw))
          + chunk(b'IEND', b''))


def png_declaring(width: int, height: int) -> bytes:
  """Width x height 1-bit grey pixels declared, a few scanlines' worth of data: what a
  decompression bomb looks like to whoever opens it (its pixels are never reached)."""
  return png(width, height, 1, 0, b'\x00' * 1000)
