"""Vertex AI Vector Search: JSON-lines files in the layout a batch index build or update reads.

    FOLDER/export-20261202T020000123456Z/embeddings-00000-of-00004.json   one record a line:
        {"id": "ROW_ID", "embedding": [...], "restricts": [{"namespace": "model", "allow":
         [model]}, {"namespace": "run", "allow": [run]}], "embedding_metadata": {uri, sha256,
         height, width}}
    FOLDER/export-20261202T020000123456Z/delete/deletes-00000-of-00001.txt   one id a line
    FOLDER/state-20261202T020000123456Z.parquet   written last: the export's record (no rows)

A datapoint's id is the collection's row id (a changed file's new vector is a new id, its old
id deleted). Each export writes a new export-* folder: a whole sync's (the first, --replace, or
after the version last applied was cleaned up) is the contentsDeltaUri of an index build or of
an update with isCompleteOverwrite (its record says `overwrite`), each later one that of an
update. An export folder without its state file is unfinished: give it to no update (the next
export writes its changes again); the index is searched in Google Cloud, so the state files, not
the index, tell the next export which version the index holds.
"""

import json
import re
from typing import Callable, Iterator, List, Optional

import apache_beam as beam

import storage
from jobs.export_target import (COMPLETE, IN_PROGRESS, METRICS_NAMESPACE, ExportState, Target,
                                TargetError, row_values, scheme_and_rest)

_STATE = re.compile(r'state-(\d{8}T\d{12}Z)\.parquet$')


def stamp() -> str:
  """Now, as 20261202T020000123456Z: names sort as they were written."""
  import datetime
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')


def records(batch) -> Iterator[bytes]:
  """The batch's rows as JSON lines (a 4320-d vector is about 45 KB of JSON), made by orjson
  straight from the float32 vectors (each number the shortest that reads back as the same
  float32, no Python float made), yielded as one element: the sink adds the last newline."""
  import orjson
  values = row_values(batch)
  beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'written').inc(batch.num_rows)
  yield b'\n'.join(orjson.dumps({
      'id': str(row_id), 'embedding': values['vector'][row],
      'restricts': [{'namespace': 'model', 'allow': [values['model'][row]]},
                    {'namespace': 'run', 'allow': [values['run'][row]]}],
      'embedding_metadata': {name: values[name][row]
                             for name in ('uri', 'sha256', 'height', 'width')}},
      option=orjson.OPT_SERIALIZE_NUMPY) for row, row_id in enumerate(values['id']))


class VertexTarget(Target):

  finishing = 'the state file'

  def __init__(self, name: str, folder: str, batch_size: int = 0):
    del batch_size  # files: the runner decides the shards
    self.name = name
    self.folder = folder
    self.export_folder: Optional[str] = None  # set by begin

  @classmethod
  def from_url(cls, text: str, batch_size: int = 0) -> 'VertexTarget':
    """vertex:FOLDER, the folder gs://, s3:// or local."""
    folder = scheme_and_rest(text)[1]
    if not folder:
      raise TargetError('--to vertex: give the folder, as vertex:gs://BUCKET/FOLDER')
    return cls(text, folder.rstrip('/'), batch_size)

  def _states(self) -> List[str]:
    return sorted(f.path for f in storage.match(storage.join(self.folder, 'state-*.parquet'))
                  if _STATE.search(f.path))

  def _latest(self):
    """(ExportState and settings of the latest complete export, its state file) or Nones."""
    import pyarrow.parquet as pq
    states = self._states()
    if not states:
      return None, None, None
    with storage.open_file(states[-1]) as f:
      metadata = pq.ParquetFile(f).schema_arrow.metadata
    settings = json.loads(metadata[b'export'])
    return ExportState.from_json(metadata[b'state'].decode()), settings, states[-1]

  def check(self, model: str, dimension: int) -> None:
    try:
      _, settings, _ = self._latest()
    except OSError as exc:
      raise TargetError(f'--to {self.name}: cannot read the folder: {exc}') from exc
    if settings is not None and (settings['model'], settings['dimension']) != (model, dimension):
      raise TargetError(f'--to {self.name}: the folder holds exports of {settings["dimension"]}'
                        f'-d vectors of {settings["model"]}, not {dimension}-d of {model}: '
                        f'choose another folder')

  def state(self) -> Optional[ExportState]:
    state, _, path = self._latest()
    done = _STATE.search(path)[1] if path else ''
    unfinished = [f.path for f in storage.match(storage.join(self.folder, 'export-*/*'))
                  if storage.basename(storage.dirname(f.path))[len('export-'):] > done]
    if unfinished and state is not None:  # its changes are written again, from the version held
      return state._replace(status=IN_PROGRESS, since=state.version,
                            last_complete=state.describe())
    return state  # an unfinished first export: the next is whole, a complete overwrite

  whole_sync_replaces = True  # a whole sync's folder is a complete overwrite

  def clear(self) -> None:
    """Nothing to remove: the whole sync that follows writes a complete overwrite."""

  def begin(self, model: str, dimension: int, state: ExportState, sample: Callable) -> None:
    self.model, self.dimension, self.overwrite = model, dimension, state.since is None
    self.stamp = stamp()
    self.export_folder = storage.join(self.folder, f'export-{self.stamp}')
    if storage.match(storage.join(self.export_folder, '*')):
      raise TargetError(f'{self.export_folder} exists: another export is writing there')

  def delete_transform(self):
    return _WriteDeletes(self)

  def write_transform(self, may_hold: bool):
    del may_hold  # each export writes a folder of its own
    return (beam.FlatMap(records)
            | beam.io.WriteToText(storage.join(self.export_folder, 'embeddings'),
                                  file_name_suffix='.json', coder=beam.coders.BytesCoder()))

  def finish(self, state: ExportState) -> None:
    """The state file: the export's record, in its Parquet metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({'id': pa.array([], pa.string())}).replace_schema_metadata({
        'state': state._replace(status=COMPLETE).to_json(),
        'export': json.dumps({'model': self.model, 'dimension': self.dimension,
                              'folder': self.export_folder, 'overwrite': self.overwrite})})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(self.folder, f'state-{self.stamp}.parquet'),
                        sink.getvalue().to_pybytes())


def _lines_of_ids(ids) -> List[str]:
  beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'deleted').inc(len(ids))
  return [str(int(i)) for i in ids]


class _WriteDeletes(beam.PTransform):

  def __init__(self, target: VertexTarget):
    super().__init__()
    self._target = target

  def expand(self, id_arrays):
    return (id_arrays
            | beam.FlatMap(_lines_of_ids)
            | beam.io.WriteToText(storage.join(self._target.export_folder, 'delete/deletes'),
                                  file_name_suffix='.txt'))
