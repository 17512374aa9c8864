"""Synthetic collections that look like PNASNet features, written as real run directories or
as a collection (one Lance table, `collection/`), with nights of churn after it.

Untrained-network features are nearly all alike, so they cannot measure recall or deduplication;
random Gaussian vectors have no neighbours worth the name. These vectors are built the way
average-pooled ReLU features behave: non-negative, skewed (a few strong features per image), with
a shared "feature popularity" profile (so unrelated images still have cosine ~0.5), grouped in
clusters of very different sizes (classes of photos), and inside a cluster spread along a few
directions (pose, light, background) rather than in all 4320 at once:

    profile  p ~ Gamma(0.5) per dimension                          shared by every image
    centre   c_k = p * (0.3 + Exponential(1) * Bernoulli(0.2))     sparse, non-negative
    member   x = ReLU(c_k + B (A_k t) * spread_k + 0.4 eps)      t ~ N(0, I_8), eps ~ N(0, p)

B is one 4320 x 64 basis scaled by the profile, A_k a cluster's 64 x 8 mixing, spread_k varies the
tightness per cluster; cluster sizes follow a Zipf-like law. Every block of BLOCK_ROWS rows comes
from its own seeded generator, so a collection is the same whatever the shard size, and is written
shard by shard (memory: the cluster centres plus one shard).

Planted pairs: a near duplicate is another row of the same block plus small noise (cosine about
0.994, above the default threshold 0.986, like a resized copy); an exact duplicate is the same
vector with the same sha256 (a byte copy).

The run directory is what the pipeline writes: `embeddings-SSSSS-of-NNNNN.parquet` through the
writer's own table code (row groups of the writer's batch size), `index-SSSSS-of-NNNNN.parquet`
through the writer's index rows, and `run_summary.json` with the launcher's fields; beside them
`planted_pairs.json` lists the planted pairs.

    python -m benchmarks.synthetic_collection --output DIR --count 100000 [--seed 0] \
        [--shard_rows 10000] [--embedding_dtype float32] [--near_duplicates 0] \
        [--exact_duplicates 0] [--model MODEL_ID] [--first_row 0]
    python -m benchmarks.synthetic_collection --collection URI --count 1000000 \
        [--churn_nights 30 --churn 0.01] [--shard_rows 10000 ...]

`--collection` writes the rows as one commit (a fragment per --shard_rows rows, written as the
night's workers write them), then `--churn_nights K` commits K nights, each replacing a random
`--churn` share of the rows by new vectors of the same URIs (a changed file: its old row removed,
a new row inserted), so that a follower's sync after 1, 10 or 30 nights can be measured.
"""

import argparse
import datetime
import json
import os
from typing import Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from run_format import EMBEDDING_DTYPES

DIMENSION = 4320
BLOCK_ROWS = 1000
BASIS_RANK = 64
CLUSTER_RANK = 8
MODEL_ID = 'builtin:pnasnet_large@synthetic-seed0'
NOISE = 0.4  # isotropic noise, relative to the profile
NEAR_DUPLICATE_NOISE = 0.12  # relative to the profile: cosine to the original about 0.994


class PlantedPair(NamedTuple):
  original: str  # uri
  duplicate: str  # uri
  kind: str  # 'near' or 'exact'


class SyntheticRun(NamedTuple):
  directory: str
  count: int
  model_id: str
  planted: List[PlantedPair]


class _Space(NamedTuple):
  profile: np.ndarray  # [dimension]
  centres: np.ndarray  # [clusters, dimension] float32
  basis: np.ndarray  # [BASIS_RANK, dimension] float32
  mixing: np.ndarray  # [clusters, CLUSTER_RANK, BASIS_RANK] float32
  spread: np.ndarray  # [clusters]
  weights: np.ndarray  # [clusters], sums to 1


CLUSTERS = 2000  # 500 images a cluster on average at 1M (sizes vary a hundredfold around that)


def _space(seed: int, dimension: int, clusters: int) -> _Space:
  rng = np.random.default_rng([seed, 2**31])
  profile = rng.gamma(0.5, 1.0, dimension).astype(np.float32)
  boost = rng.exponential(1.0, (clusters, dimension)) * (rng.random((clusters, dimension)) < 0.2)
  centres = (profile * (0.3 + boost)).astype(np.float32)
  basis = (rng.standard_normal((BASIS_RANK, dimension)) * profile / np.sqrt(BASIS_RANK))
  mixing = rng.standard_normal((clusters, CLUSTER_RANK, BASIS_RANK)) / np.sqrt(CLUSTER_RANK)
  spread = rng.uniform(0.6, 2.0, clusters)
  weights = 1.0 / np.arange(1, clusters + 1) ** 0.8
  rng.shuffle(weights)
  return _Space(profile, centres, basis.astype(np.float32), mixing.astype(np.float32),
                spread.astype(np.float32), weights / weights.sum())


def _block(space: _Space, seed: int, block: int, rows: int, noise: float) -> np.ndarray:
  rng = np.random.default_rng([seed, block])
  dimension = space.profile.shape[0]
  labels = rng.choice(len(space.weights), rows, p=space.weights)
  latent = rng.standard_normal((rows, CLUSTER_RANK), dtype=np.float32)
  coefficients = np.einsum('ri,rij->rj', latent, space.mixing[labels]) * space.spread[labels,
                                                                                      None]
  vectors = space.centres[labels] + coefficients @ space.basis
  vectors += rng.standard_normal((rows, dimension), dtype=np.float32) * (noise * space.profile)
  return np.maximum(vectors, 0, out=vectors)


def _plant(rng, rows: int, near: int, exact: int) -> List[Tuple[int, int, str]]:
  """(original row, duplicate row, kind) inside one block; a row is in at most one pair."""
  picked = rng.permutation(rows)[:2 * (near + exact)]
  kinds = ['near'] * near + ['exact'] * exact
  return [(int(min(a, b)), int(max(a, b)), kind)
          for a, b, kind in zip(picked[0::2], picked[1::2], kinds)]


def _spread_over_blocks(total: int, blocks: int, rng) -> np.ndarray:
  return np.bincount(rng.integers(0, blocks, total), minlength=blocks) if total else np.zeros(
      blocks, int)


def synthetic_vectors(count: int, seed: int, dimension: int = DIMENSION,
                      clusters: int = CLUSTERS, near_duplicates: int = 0,
                      exact_duplicates: int = 0, first_row: int = 0
                      ) -> Iterator[Tuple[int, np.ndarray, List[Tuple[int, int, str]]]]:
  """(first row number, float32 block, planted (original, duplicate, kind) row numbers) per
  block; rows `first_row` .. `first_row + count` of the collection the seed defines."""
  space = _space(seed, dimension, clusters)
  first_block, last_block = first_row // BLOCK_ROWS, -(-(first_row + count) // BLOCK_ROWS)
  blocks = last_block - first_block
  plan_rng = np.random.default_rng([seed, 2**31 + 1, first_row])
  near = _spread_over_blocks(near_duplicates, blocks, plan_rng)
  exact = _spread_over_blocks(exact_duplicates, blocks, plan_rng)
  for number, block in enumerate(range(first_block, last_block)):
    start = max(first_row, block * BLOCK_ROWS)
    stop = min(first_row + count, (block + 1) * BLOCK_ROWS)
    vectors = _block(space, seed, block, BLOCK_ROWS, NOISE)[start - block * BLOCK_ROWS:
                                                           stop - block * BLOCK_ROWS]
    rows = stop - start
    pairs = _plant(np.random.default_rng([seed, block, 7]), rows,
                   min(near[number], rows // 2), min(exact[number], rows // 2 - near[number]))
    noise_rng = np.random.default_rng([seed, block, 11])
    for original, duplicate, kind in pairs:
      vectors[duplicate] = vectors[original]
      if kind == 'near':
        vectors[duplicate] += noise_rng.standard_normal(dimension, dtype=np.float32) * (
            NEAR_DUPLICATE_NOISE * space.profile)
        np.maximum(vectors[duplicate], 0, out=vectors[duplicate])
    yield start, vectors, [(start + a, start + b, kind) for a, b, kind in pairs]


def uri_of(row: int) -> str:
  return f'gs://synthetic-photos/{row // 10_000:04d}/{row:08d}.jpg'


def _sha256_of(row: int) -> str:
  import hashlib
  return hashlib.sha256(uri_of(row).encode()).hexdigest()


def _write_index(directory: str, number: int, shards: int, rows: List[dict]) -> str:
  """One index shard per embeddings shard; empties `rows`."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  from run_format import INDEX_SCHEMA
  path = os.path.join(directory, f'index-{number:05d}-of-{shards:05d}.parquet')
  pq.write_table(pa.Table.from_pylist(rows, INDEX_SCHEMA), path)
  rows.clear()
  return path


def write_synthetic_run(directory: str, count: int, seed: int = 0, dimension: int = DIMENSION,
                        clusters: int = CLUSTERS, shard_rows: int = 10_000,
                        embedding_dtype: str = 'float32', near_duplicates: int = 0,
                        exact_duplicates: int = 0, model_id: str = MODEL_ID,
                        first_row: int = 0,
                        finished_at: Optional[str] = None) -> SyntheticRun:
  """Writes rows `first_row` .. `first_row + count` of the seed's collection as a finished run
  under `directory` (local); `first_row` makes a later night's run of the same collection."""
  import pyarrow.parquet as pq
  from run_format import RunSummary, embeddings_schema
  from transforms.embed import Embedding
  from transforms.provenance import Provenance, project_version, recipe
  from transforms.write import ENCODE_BATCH_SIZE, embedded_index_row, embeddings_to_table
  if embedding_dtype not in EMBEDDING_DTYPES:
    raise ValueError(f'embedding_dtype must be one of {EMBEDDING_DTYPES}, not '
                     f'{embedding_dtype!r}')
  os.makedirs(directory, exist_ok=True)
  provenance = Provenance(model_id, f'synthetic-seed{seed}',
                          recipe('float32', 1.0, False, embedding_dtype=embedding_dtype),
                          project_version())
  schema = embeddings_schema(dimension, embedding_dtype)
  shards = max(1, -(-count // shard_rows))
  started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='milliseconds')
  planted: List[PlantedPair] = []
  index_rows, files, writer = [], [], None
  exact_sources = {}
  for start, vectors, pairs in synthetic_vectors(count, seed, dimension, clusters,
                                                 near_duplicates, exact_duplicates, first_row):
    planted += [PlantedPair(uri_of(a), uri_of(b), kind) for a, b, kind in pairs]
    exact_sources.update({b: a for a, b, kind in pairs if kind == 'exact'})
    offset = 0
    while offset < len(vectors):
      row = start + offset - first_row  # the row's place in this run
      if row % shard_rows == 0:
        if writer is not None:
          writer.close()
          files.append(_write_index(directory, row // shard_rows - 1, shards, index_rows))
        files.append(os.path.join(
            directory, f'embeddings-{row // shard_rows:05d}-of-{shards:05d}.parquet'))
        writer = pq.ParquetWriter(files[-1], schema, compression='snappy')
      size = min(ENCODE_BATCH_SIZE, len(vectors) - offset, shard_rows - row % shard_rows)
      batch = [Embedding(uri_of(n), _sha256_of(exact_sources.get(n, n)), 480, 640,
                         150_000 + n % 50_000, 1_767_225_600_000_000 + n, model_id, v)
               for n, v in zip(range(start + offset, start + offset + size),
                               vectors[offset:offset + size])]
      writer.write_table(embeddings_to_table(batch, provenance, schema))
      index_rows += [embedded_index_row(e, provenance) for e in batch]
      offset += size
  writer.close()
  files.append(_write_index(directory, shards - 1, shards, index_rows))
  finished_at = finished_at or datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='milliseconds')
  summary = RunSummary(
      model=model_id, model_handle='builtin:pnasnet_large', checkpoint=None, seed=seed,
      weights=provenance.weights, compute_dtype='float32', center_crop_fraction=1.0,
      jpeg_draft=False, embedding_dtype=embedding_dtype, recipe=provenance.recipe, pipeline_version=provenance.version,
      embedding_size=dimension, image_size=[331, 331],
      # The first night lists the bucket; a later one embeds a delta manifest of its new rows,
      # so it does not cover (and so does not retire, for the readers) the earlier rows.
      input=[] if first_row else ['gs://synthetic-photos/**'],
      input_manifest=[f'gs://synthetic-photos/manifests/rows-{first_row}.txt'] if first_row else [],
      output=directory, output_format='parquet',
      runner='synthetic', started_at=started_at, matched=count, skipped=0, embedded=count,
      failed=0, failed_by_stage={'read': 0, 'decode': 0, 'inference': 0}, example_failures=[],
      files=sorted(files), finished_at=finished_at, wall_time_seconds=0.0,
      images_per_second=None).to_dict()
  summary.update({'synthetic': {
      'seed': seed, 'first_row': first_row, 'clusters': clusters,
      'near_duplicates': near_duplicates, 'exact_duplicates': exact_duplicates}})
  with open(os.path.join(directory, 'run_summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(directory, 'planted_pairs.json'), 'w') as f:
    json.dump([p._asdict() for p in planted], f)
  return SyntheticRun(directory, count, model_id, planted)


class SyntheticCollection(NamedTuple):
  uri: str
  count: int
  model_id: str
  planted: List[PlantedPair]
  versions: List[int]  # the first commit's, then each churn night's


def collection_table(uris: List[str], vectors: np.ndarray, model_id: str, run: str,
                     embedding_dtype: str = 'float32', sha256s: Optional[List[str]] = None):
  """Rows of the collection's schema (what a night's workers write) for these URIs and vectors;
  the other columns as a night fills them for a 640 x 480 image."""
  import pyarrow as pa
  from collection.table import schema
  count, dimension = vectors.shape
  table_schema = schema(model_id, dimension, embedding_dtype)
  values = {'uri': uris,
            'sha256': sha256s if sha256s is not None else [_sha256_of_uri(u) for u in uris],
            'height': [480] * count, 'width': [640] * count, 'model': [model_id] * count,
            'run': [run] * count,
            'embedded_at': [datetime.datetime.now(datetime.timezone.utc)] * count}
  columns = []
  for field in table_schema:
    if field.name == 'embedding':
      flat = pa.array(np.ascontiguousarray(vectors, embedding_dtype).reshape(-1))
      columns.append(pa.FixedSizeListArray.from_arrays(flat, type=field.type))
    elif field.name in values:
      columns.append(pa.array(values[field.name], field.type))
    else:
      columns.append(pa.nulls(count, field.type))
  return pa.Table.from_arrays(columns, schema=table_schema)


def _sha256_of_uri(uri: str) -> str:
  import hashlib
  return hashlib.sha256(uri.encode()).hexdigest()


def _row_ids_by_fragment(current) -> tuple:
  """(fragment id, row id) of every row of a collection version: what a night removes by."""
  fragments, ids = [], []
  for fragment_id in current.fragment_ids():
    for batch in current.fragment_batches(fragment_id, []):
      ids.append(batch.column('_rowid').to_numpy())
      fragments.append(np.full(batch.num_rows, fragment_id, np.int64))
  return (np.concatenate(fragments) if fragments else np.zeros(0, np.int64),
          np.concatenate(ids) if ids else np.zeros(0, np.uint64))


def write_synthetic_collection(uri: str, count: int, seed: int = 0, dimension: int = DIMENSION,
                               clusters: int = CLUSTERS, fragment_rows: int = 10_000,
                               embedding_dtype: str = 'float32', near_duplicates: int = 0,
                               exact_duplicates: int = 0, model_id: str = MODEL_ID,
                               churn_nights: int = 0, churn: float = 0.01
                               ) -> SyntheticCollection:
  """Rows 0 .. count of the seed's collection as a new collection at `uri`, in one commit; then
  `churn_nights` nights, each giving a random `churn` share of the URIs a new vector (new rows
  of the same seed's collection, past `count`)."""
  import collection
  created = collection.create(uri, model_id, dimension, embedding_dtype)
  planted: List[PlantedPair] = []
  fragments = []
  for start, vectors, pairs in synthetic_vectors(count, seed, dimension, clusters,
                                                 near_duplicates, exact_duplicates):
    planted += [PlantedPair(uri_of(a), uri_of(b), kind) for a, b, kind in pairs]
    exact = {b: a for a, b, kind in pairs if kind == 'exact'}
    for offset in range(0, len(vectors), fragment_rows):
      rows = range(start + offset, start + min(offset + fragment_rows, len(vectors)))
      fragments += collection.write_fragment(uri, collection_table(
          [uri_of(n) for n in rows], vectors[offset:offset + len(rows)], model_id,
          'synthetic-night-0', embedding_dtype, [_sha256_of(exact.get(n, n)) for n in rows]),
          created.storage_options)
  versions = [collection.commit_night(uri, collection.NightChanges(
      'synthetic-night-0', created.version, fragments, []))]
  rng = np.random.default_rng([seed, 2**31 + 2])
  next_row = count
  for night in range(1, churn_nights + 1):
    current = collection.open_collection(uri)
    fragment_of, row_ids = _row_ids_by_fragment(current)
    chosen = np.sort(rng.permutation(len(row_ids))[:int(round(churn * len(row_ids)))])
    uris = current.take(row_ids[chosen], ['uri']).column('uri').to_pylist()
    run = f'synthetic-night-{night}'
    fragments = []
    for start, vectors, _ in synthetic_vectors(len(uris), seed, dimension, clusters,
                                               first_row=next_row):
      for offset in range(0, len(vectors), fragment_rows):
        first = start - next_row + offset
        part = uris[first:first + min(fragment_rows, len(vectors) - offset)]
        fragments += collection.write_fragment(uri, collection_table(
            part, vectors[offset:offset + len(part)], model_id, run, embedding_dtype),
            current.storage_options)
    next_row += len(uris)
    versions.append(collection.commit_night(uri, collection.NightChanges(
        run, current.version, fragments,
        list(zip(fragment_of[chosen].tolist(), row_ids[chosen].tolist())))))
  return SyntheticCollection(uri, count, model_id, planted, versions)


def main(argv: Optional[List[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument('--output', help='the run directory to write (local)')
  where.add_argument('--collection', help='the collection to create (a new local folder, '
                     'gs://, s3://)')
  parser.add_argument('--count', type=int, required=True)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--dimension', type=int, default=DIMENSION)
  parser.add_argument('--clusters', type=int, default=CLUSTERS)
  parser.add_argument('--shard_rows', type=int, default=10_000)
  parser.add_argument('--embedding_dtype', choices=EMBEDDING_DTYPES, default='float32')
  parser.add_argument('--near_duplicates', type=int, default=0)
  parser.add_argument('--exact_duplicates', type=int, default=0)
  parser.add_argument('--model', default=MODEL_ID, help='the model id recorded')
  parser.add_argument('--first_row', type=int, default=0,
                      help='start further into the same collection (a later night)')
  parser.add_argument('--churn_nights', type=int, default=0,
                      help='with --collection: nights committed after the first')
  parser.add_argument('--churn', type=float, default=0.01,
                      help='the share of the rows each churn night replaces')
  args = parser.parse_args(argv)
  if args.collection:
    made = write_synthetic_collection(
        args.collection, args.count, args.seed, args.dimension, args.clusters, args.shard_rows,
        args.embedding_dtype, args.near_duplicates, args.exact_duplicates, args.model,
        args.churn_nights, args.churn)
    print(f'{made.uri}: {made.count} vectors, versions {made.versions}, '
          f'{len(made.planted)} planted pairs')
    return
  run = write_synthetic_run(args.output, args.count, args.seed, args.dimension, args.clusters,
                            args.shard_rows, args.embedding_dtype, args.near_duplicates,
                            args.exact_duplicates, args.model, args.first_row)
  print(f'{run.directory}: {run.count} vectors, {len(run.planted)} planted pairs '
        f'(planted_pairs.json)')


if __name__ == '__main__':
  main()
