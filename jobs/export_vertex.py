"""Vertex AI Vector Search: JSON-lines files in the layout a batch index build or update reads.

    FOLDER/export-20261202T020000123456Z/embeddings-00000-of-00004.json   one record a line:
        {"id": uri, "embedding": [...], "restricts": [{"namespace": "model", "allow": [model]},
         {"namespace": "run", "allow": [run]}], "embedding_metadata": {uri, sha256, height, width}}
    FOLDER/export-20261202T020000123456Z/delete/deletes-00000-of-00001.txt   one id a line
    FOLDER/state-20261202T020000123456Z/rows-00000-of-00002.parquet   (uri, run) of every row
        the index holds once that export folder is applied, written by the export's workers
    FOLDER/state-20261202T020000123456Z.parquet   written last: the export's record (no rows; a
        state file of an earlier version holds the rows itself)

Each export writes a new export-* folder: the first is the contentsDeltaUri of the index build
(or an update with isCompleteOverwrite), each later one that of an update. An export folder
without its state file is unfinished: give it to no update (the next export rewrites what it
held); the index is searched in Google Cloud, so the state files, not the index, tell the next
export what the index holds.
"""

import json
import re
from typing import Callable, Iterator, List, Optional, Tuple

import apache_beam as beam

import storage
from jobs.export_target import (COMPLETE, IN_PROGRESS, ExportRow, ExportState, Target,
                                TargetError, scheme_and_rest)

_STATE = re.compile(r'state-(\d{8}T\d{12}Z)\.parquet$')
_ROWS = 'rows'  # the state file's metadata key: its rows' glob in the folder, when not in it


def stamp() -> str:
  """Now, as 20261202T020000123456Z: names sort as they were written."""
  import datetime
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')


def record(row: ExportRow) -> str:
  return json.dumps({
      'id': row.uri, 'embedding': row.vector.tolist(),
      'restricts': [{'namespace': 'model', 'allow': [row.model]},
                    {'namespace': 'run', 'allow': [row.run]}],
      'embedding_metadata': {'uri': row.uri, 'sha256': row.sha256, 'height': row.height,
                             'width': row.width}})


class VertexTarget(Target):

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
    if unfinished:
      return ExportState(IN_PROGRESS, (), 0, '', None, state.describe() if state else None)
    return state

  records_collection = True

  def current_rows(self) -> Iterator[Tuple[str, str]]:
    import pyarrow.parquet as pq
    _, _, path = self._latest()
    if path is None:
      return
    with storage.open_file(path) as f:
      rows = pq.ParquetFile(f).schema_arrow.metadata.get(_ROWS.encode())
    paths = ([info.path for info in storage.match(storage.join(self.folder, rows.decode()))]
             if rows else [path])
    for part in paths:
      with storage.open_file(part) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65_536):
          yield from zip(batch.column('uri').to_pylist(), batch.column('run').to_pylist())

  def _rows_name(self) -> str:
    """The rows' file prefix, in the folder."""
    return f'state-{self.stamp}/{_ROWS}'

  def begin(self, model: str, dimension: int, state: ExportState, sample: Callable) -> None:
    self.model, self.dimension = model, dimension
    self.stamp = stamp()
    self.export_folder = storage.join(self.folder, f'export-{self.stamp}')
    if storage.match(storage.join(self.export_folder, '*')):
      raise TargetError(f'{self.export_folder} exists: another export is writing there')

  def delete_transform(self):
    return _WriteDeletes(self)

  def write_transform(self):
    return (beam.Map(record)
            | beam.io.WriteToText(storage.join(self.export_folder, 'embeddings'),
                                  file_name_suffix='.json'))

  def collection_transform(self):
    import pyarrow as pa
    schema = pa.schema([('uri', pa.string()), ('run', pa.string())])
    return (beam.Map(lambda row: {'uri': row[0], 'run': row[1]})
            | beam.io.WriteToParquet(storage.join(self.folder, self._rows_name()), schema,
                                     file_name_suffix='.parquet'))

  def finish(self, state: ExportState) -> None:
    """The state file, naming the rows the apply pipeline wrote (collection_transform)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({'uri': pa.array([], pa.string()), 'run': pa.array([], pa.string())})
    table = table.replace_schema_metadata({
        'state': state._replace(status=COMPLETE).to_json(),
        'export': json.dumps({'model': self.model, 'dimension': self.dimension,
                              'folder': self.export_folder}),
        _ROWS: self._rows_name() + '-*.parquet'})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(self.folder, f'state-{self.stamp}.parquet'),
                        sink.getvalue().to_pybytes())


class _WriteDeletes(beam.PTransform):

  def __init__(self, target: VertexTarget):
    super().__init__()
    self._target = target

  def expand(self, uri_batches):
    return (uri_batches
            | beam.FlatMap(lambda uris: uris)
            | beam.io.WriteToText(storage.join(storage.join(self._target.export_folder, 'delete'), 'deletes'),
                                  file_name_suffix='.txt'))
