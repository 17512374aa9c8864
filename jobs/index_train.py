"""Training the neighbour index on one worker, from samples every worker draws of its fragment:
the PCA first when the plan has one, then, on a second, PCA-reduced sample, the IVF lists and
the PQ codes (HNSW needs no training). The probes are held back from the first sample."""

import io
from typing import List, Optional

import apache_beam as beam
import numpy as np

import storage
from embeddings import faiss_util
from embeddings.similarity import unit_rows
from embeddings.neighbour_index import embedding_rows
from jobs.collection_reads import Snapshot, read_fragment, row_ids
from jobs.index_pieces import METRICS_NAMESPACE, FragmentRef, npz_bytes, put_file
from jobs.index_plan import IndexPlan, new_index
from jobs.index_quality import PROBES

PCA_SAMPLE = 20_000  # vectors to train the PCA on
TRAINING_ITERATIONS = 10
PQ_POINTS_PER_CENTROID = 64
RESIDUAL_TABLES_MAX = 256_000_000  # bytes


def training_settings(plan: IndexPlan, dimension: int, seed: int, count: int) -> dict:
  """What the pipeline trains for the plan over `count` rows: the fractions of them its two
  samples draw, the first large enough for the PCA (or the lists and codes) and the probes."""
  first_sample = PCA_SAMPLE if plan.pca_dimension else plan.train_sample
  first_sample = max(first_sample, 20 * PROBES)  # probes: a tenth at most
  return {'plan': plan, 'dimension': dimension, 'seed': seed,
          'fraction': min(1.0, (first_sample + PROBES) * 1.2 / max(count, 1)),
          'reduced_fraction': min(1.0, plan.train_sample * 1.2 / max(count, 1))}


class SampleFragment(beam.DoFn):
  """About `fraction` of a fragment's rows as unit vectors (PCA-reduced when given a PCA): their
  ids are read, then the chosen rows' vectors alone, by row id. Written to a file whose path is
  the output: a sample of 4320-d vectors is hundreds of MB, which as Beam elements would be
  copied by every coder and consumer on the way to the trainer."""

  def __init__(self, snapshot: Snapshot, fraction: float, seed: int, samples: str):
    self._snapshot = snapshot
    self._fraction = fraction
    self._seed = seed
    self._samples = samples

  def setup(self):
    self._collection = self._snapshot.open()

  def process(self, ref: FragmentRef, pca_bytes: Optional[bytes] = None):
    ids = np.concatenate([np.zeros(0, np.int64)] + [
        row_ids(batch) for batch in read_fragment(self._collection, ref.fragment_id, [])])
    ids = ids[np.random.default_rng(self._seed + ref.number).random(len(ids)) < self._fraction]
    if not len(ids):
      return
    sample = unit_rows(embedding_rows(self._collection, ids))  # the chosen rows' vectors only
    if pca_bytes is not None:
      wrapper = faiss_util.from_bytes(pca_bytes)  # owns the PCA: alive while it is applied
      sample = wrapper.chain.at(0).apply(sample)
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'sampled').inc(len(ids))
    path = storage.join(self._samples, f'sample-{self._seed}-{ref.number:06d}.npz')
    put_file(path, npz_bytes({'ids': ids, 'vectors': sample}))
    yield path


def _concatenate(sample_files: List[str]) -> tuple:
  """(ids, vectors) of the sample files, in fragment order whatever the runner."""
  parts = [np.load(io.BytesIO(storage.read_bytes(path))) for path in sorted(sample_files)]
  return (np.concatenate([part['ids'] for part in parts]),
          np.concatenate([part['vectors'] for part in parts]))


def split_probes(samples: List[str], seed: int) -> tuple:
  """(probes {'ids', 'vectors'}, training vectors): the probes are held back from training;
  PROBES of them, or a tenth of the sample when it is smaller than 1,000."""
  ids, vectors = _concatenate(samples)
  order = np.random.default_rng(seed).permutation(len(ids))
  probes = order[:min(PROBES, len(ids) // 10)]
  train = np.sort(order[len(probes):])
  return {'ids': ids[probes], 'vectors': vectors[probes]}, vectors[train]


def train_pca(samples: List[str], plan: IndexPlan, dimension: int, seed: int) -> bytes:
  faiss = faiss_util.faiss()
  _, train = split_probes(samples, seed)
  pca = faiss.PCAMatrix(dimension, plan.pca_dimension, 0, True)  # then a random rotation
  pca.train(np.ascontiguousarray(train[:PCA_SAMPLE]))
  return faiss_util.to_bytes(faiss.IndexPreTransform(_projection_only(pca),
                                                     faiss.IndexFlatL2(plan.pca_dimension)))


def _projection_only(pca):
  """The trained PCA's projection (A, b) alone: a PCAMatrix also stores the full eigenvector
  matrix training needed, dimension^2 floats (75 MB at 4320-d, 75 bytes a vector at 1M)."""
  faiss = faiss_util.faiss()
  projection = faiss.LinearTransform(pca.d_in, pca.d_out, True)
  faiss.copy_array_to_vector(faiss.vector_to_array(pca.A), projection.A)
  faiss.copy_array_to_vector(faiss.vector_to_array(pca.b), projection.b)
  projection.is_trained = True
  return projection


def train_index(samples: List[str], reduced: Optional[List[str]], pca_bytes: Optional[bytes],
                plan: IndexPlan, dimension: int, seed: int) -> bytes:
  """The trained, empty index; trained on the reduced sample when the plan has a PCA. HNSW
  needs no training."""
  # The PCA lives in `wrapper`, which this function holds until the index is serialized.
  wrapper = faiss_util.from_bytes(pca_bytes) if pca_bytes is not None else None
  pca = wrapper.chain.at(0) if wrapper is not None else None
  index = new_index(plan, dimension, pca)
  if plan.kind == 'hnsw':
    return faiss_util.to_bytes(index)
  probes, train = split_probes(samples, seed)
  _quick_training(index)
  if pca is not None:
    reduced_ids, train = _concatenate(reduced)
    train = train[~np.isin(reduced_ids, probes['ids'])]
    faiss_util.faiss().downcast_index(index.index).train(
        np.ascontiguousarray(train[:plan.train_sample]))
    index.is_trained = True
  else:
    index.train(np.ascontiguousarray(train[:plan.train_sample]))
  return faiss_util.to_bytes(index)


def _quick_training(index) -> None:
  """Ten k-means iterations for the lists and for each PQ sub-quantizer (FAISS's defaults, 25
  on up to 65k points, take minutes per sub-quantizer count at 1M for no measurable recall);
  no polysemous training (index_factory's default: 30 s for PQ8 on 10k 32-d vectors, for codes
  this index never compares with each other). Codes of the residuals from the list centroid
  (better codes) only while FAISS's precomputed tables for them, lists x m x 256 floats, stay
  under RESIDUAL_TABLES_MAX (they would be 1 GB for the 1M plan): else codes of the vectors,
  one distance table a query, the candidates being re-ranked from the refine store anyway."""
  faiss = faiss_util.faiss()
  ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
  ivf.cp.niter = TRAINING_ITERATIONS
  if ivf.nlist == 1:  # the exhaustive plan: one list, any count of points (FAISS warns below 39)
    ivf.cp.min_points_per_centroid = 1
  if isinstance(ivf, faiss.IndexIVFPQ):
    ivf.pq.cp.niter = TRAINING_ITERATIONS
    ivf.pq.cp.max_points_per_centroid = PQ_POINTS_PER_CENTROID
    ivf.do_polysemous_training = False
    ivf.by_residual = ivf.nlist * ivf.pq.M * ivf.pq.ksub * 4 <= RESIDUAL_TABLES_MAX
