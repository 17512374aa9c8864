"""Listing pieces at any bucket shape: a flat prefix is cut into name ranges that are listed once
each, in bounded pieces, and a page that fails is listed again by its piece alone; gs:// and s3://
against tests/synthetic_bucket.py."""

import collections

import apache_beam as beam
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from tests.fault_proxy import FaultRule
from tests.synthetic_bucket import SyntheticBuckets, SyntheticNames
from transforms.listing import list_piece, plan_listing
from transforms.read import MatchFiles

FLAT = SyntheticNames(12_000, 1)  # p0000/img0000000.jpg ... : one prefix, no sub-folders
PIECE_PAGES = 2


def _point_at(server, scheme, monkeypatch):
  if scheme == 'gs':
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', server.url)
    options = []
  else:
    options = [f'--s3_endpoint_url={server.url}', '--s3_access_key_id=testing',
               '--s3_secret_access_key=testing', '--s3_region_name=us-east-1']
  FileSystems.set_options(PipelineOptions(options))
  return options


def _every_name(scheme):
  return [f'{scheme}://synthetic/{FLAT[i]}' for i in range(len(FLAT))]


@pytest.mark.parametrize('scheme', ['gs', 's3'])
def test_a_flat_prefix_is_cut_into_bounded_pieces_that_list_each_name_once(scheme, monkeypatch):
  with SyntheticBuckets({'synthetic': FLAT}) as server:
    options = _point_at(server, scheme, monkeypatch)
    with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
      matched = pipeline | MatchFiles([f'{scheme}://synthetic/p0000/'],
                                      piece_pages=PIECE_PAGES)
      assert_that(matched['refs'] | beam.Map(lambda ref: ref.uri), equal_to(_every_name(scheme)))
    requests = list(server.listings)

    # The same cuts, piece by piece in this process: no piece lists more than PIECE_PAGES pages.
    server.listings.clear()
    pending, pieces, names = collections.deque([plan_listing(
        f'{scheme}://synthetic/p0000/')._replace(piece_pages=PIECE_PAGES)]), 0, []
    while pending:
      piece, pieces = pending.popleft(), pieces + 1
      pages = list(list_piece(piece))
      assert len(pages) <= PIECE_PAGES
      for listed in pages:
        names.extend(ref.uri for ref in listed.refs)
        pending.extend(listed.pieces)
  assert sorted(names) == _every_name(scheme) and len(names) == len(set(names))
  assert pieces > 3
  # About one pass: 12 full pages, plus a request per piece that fills less than a page.
  assert len(requests) == len(set(requests)) <= len(FLAT) // 1000 + 2 * pieces
  print(f'{scheme}: {pieces} pieces, {len(requests)} list requests for {len(FLAT)} names')


@pytest.mark.parametrize('scheme', ['gs', 's3'])
def test_a_page_that_fails_is_listed_again_by_its_piece_alone(scheme, monkeypatch):
  """A 400 is not retried by the storage clients: the piece asks again, from where it was."""
  cut_piece_starts = FaultRule('^synthetic/', 400, kinds=['list'], times=1,
                               query=r'(startOffset|start-after)=.')
  with SyntheticBuckets({'synthetic': FLAT}, rules=[cut_piece_starts]) as server:
    options = _point_at(server, scheme, monkeypatch)
    with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
      matched = pipeline | MatchFiles([f'{scheme}://synthetic/**.jpg'], piece_pages=PIECE_PAGES)
      assert_that(matched['refs'] | beam.Map(lambda ref: ref.uri), equal_to(_every_name(scheme)))
  [(_, failed, fault)] = server.faulted_paths
  assert fault == 400
  # Every answered page was asked once: nothing but the failed page was listed again.
  assert len(server.listings) == len(set(server.listings))
