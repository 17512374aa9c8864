"""The run's heartbeat comes from where the work is (the writes outlast the matching), and a stale
claim of a Dataflow run is cleaned only once Dataflow says its job has ended."""

import datetime
import http.server
import json
import threading
import time
import uuid

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.dataflow_jobs import record_job
from pipeline.output_dir import OutputExistsError, claim_output
from run_format import CLAIM_FILE, SUMMARY_FILE
from storage import run_dirs
from tests.fault_proxy import STALL, FaultProxy, FaultRule
from tests.json_handler import JsonHandler
from tests.test_pipeline import _build_without_launcher
from transforms import heartbeat
from transforms.embed import Embedding
from transforms.provenance import Provenance
from transforms.write import WriteEmbeddings

HOURS_AGO = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=3)).isoformat()
# A run launched elsewhere on a remote runner: alive only as long as its claim is rewritten.
REMOTE_CLAIM = {'runner': 'DataflowRunner', 'host': 'a-laptop', 'pid': 4321,
                'started_at': HOURS_AGO}
DEADLINE_SECONDS = 60


@pytest.fixture
def quick_beats(monkeypatch):
  """A beat every 0.5 s (each takes a few requests to the store), stale after 20 s: the
  production 5 min and 1 h, shrunk."""
  monkeypatch.setattr(heartbeat, 'HEARTBEAT_SECONDS', 0.5)
  monkeypatch.setattr(run_dirs, 'CLAIM_STALE_SECONDS', 20)


class _SlowShards:
  """An S3 run directory whose embeddings shards are written through a proxy that holds each of
  their requests 1 s; the claim and everything else pass at once."""

  def __init__(self, s3_server):
    self.server = s3_server
    bucket = f'beats-{uuid.uuid4().hex[:8]}'
    s3_server.create_bucket(bucket)
    self.output = f's3://{bucket}/run1'
    self._key = f'run1/{CLAIM_FILE}'
    self._bucket = bucket
    s3_server.upload(f'{self.output}/{CLAIM_FILE}', json.dumps(REMOTE_CLAIM).encode())
    self.proxy = FaultProxy(s3_server.endpoint, stall_seconds=1.0, rules=[
        FaultRule(f'^{bucket}/run1/beam-temp-embeddings-', STALL, kinds=['write'])])

  def __enter__(self):
    self.proxy.start()
    self.options = [o.replace(self.server.endpoint, self.proxy.url) for o in self.server.options]
    return self

  def __exit__(self, *exc_info):
    self.proxy.stop()

  def claim(self) -> dict:
    body = self.server.client.get_object(Bucket=self._bucket, Key=self._key)['Body'].read()
    return json.loads(body)

  def beat_after_writes_began(self) -> datetime.datetime:
    """Waits for the first held shard write, then for a heartbeat newer than it: its time."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not self.proxy.faulted_paths and time.monotonic() < deadline:
      time.sleep(0.02)
    began = datetime.datetime.now(datetime.timezone.utc)
    while time.monotonic() < deadline:
      beat = run_dirs._timestamp(  # pylint: disable=protected-access
          self.claim().get('heartbeat_at'))
      if beat and beat > began:
        return beat
      time.sleep(0.02)
    raise AssertionError('no heartbeat while the shards were written')


def _in_thread(function, results):
  def call():
    try:
      results.append(function())
    except Exception as exc:  # pylint: disable=broad-except; the test asserts on it
      results.append(exc)
  thread = threading.Thread(target=call)
  thread.start()
  return thread


def test_the_claim_stays_fresh_while_the_writes_outlast_the_matching(s3_server, image_folder,
                                                                     quick_beats):
  """The whole graph on the FnApiRunner. Matching has ended before the first shard is written
  (the GPU step waits for the count of what it embeds), yet while the writes are held the claim's
  heartbeat goes on, and a launch into the same output with --clean_unfinished meanwhile finds
  the run alive and deletes nothing."""
  with _SlowShards(s3_server) as store:
    pipeline = _build_without_launcher([f'--input={image_folder}/*.png', f'--output={store.output}',
                                        '--model=builtin:pnasnet_tiny'] + store.options)

    def launch_while_writing():
      store.beat_after_writes_began()
      with pytest.raises(OutputExistsError) as refused:
        claim_output(store.output, {'run': 2}, PipelineOptions(store.options),
                     clean_unfinished=True)
      return str(refused.value)

    results = []
    watcher = _in_thread(launch_while_writing, results)
    pipeline.run().wait_until_finish()
    watcher.join()
  [refusal] = results
  assert isinstance(refusal, str), refusal
  assert 'still going' in refusal and 'its files are not deleted' in refusal
  assert store.claim()['host'] == 'a-laptop'  # the claim is still the run's
  assert s3_server.list(f'{store.output}/{SUMMARY_FILE}')  # which finished


def test_a_shard_being_written_beats_with_nothing_beside_it(s3_server, quick_beats):
  """The write stage alone, no stage beside it that beats: the writer holds the beat from its
  shard's first record until the shard is uploaded."""
  vectors = [Embedding(f'mem://{i}.png', f'{i:064x}', 4, 4, 10, None, 'm', np.full(8, i, 'f4'))
             for i in range(3)]
  with _SlowShards(s3_server) as store:
    results = []
    watcher = _in_thread(store.beat_after_writes_began, results)
    with beam.Pipeline(options=PipelineOptions(store.options)) as pipeline:
      _ = (pipeline | beam.Create(vectors)
           | WriteEmbeddings(store.output, Provenance('m', 'w', 'r', 'v'), 8))
    watcher.join()
  [beat] = results
  assert isinstance(beat, datetime.datetime), beat
  assert s3_server.list(f'{store.output}/embeddings-')


class _DataflowJobs:
  """A loopback stand-in for Dataflow's REST API, projects.locations.jobs.get: every job is in
  `state`; the paths asked are kept."""

  def __init__(self, state: str):
    self.state = state
    self.asked = []
    jobs = self

    class Handler(JsonHandler):

      def do_GET(self):  # pylint: disable=invalid-name
        jobs.asked.append(self.path.split('?')[0])
        job_id = self.path.split('?')[0].rsplit('/', 1)[-1]
        self.send_json({'id': job_id, 'currentState': jobs.state})

    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self._server.server_address[1]}'
    threading.Thread(target=self._server.serve_forever, daemon=True).start()

  def stop(self):
    self._server.shutdown()
    self._server.server_close()


@pytest.fixture
def stale_dataflow_run(tmp_path):
  """An output claimed by a Dataflow run whose heartbeat stopped hours ago, with its job recorded
  as the launcher records it, and a sink's temporary folder."""
  output = str(tmp_path / 'out')
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / CLAIM_FILE).write_text(json.dumps(REMOTE_CLAIM))
  record_job(output, '2026-12-08_01_02_03-42',
             PipelineOptions(['--project=photos', '--region=europe-west4']))
  temp = tmp_path / 'out' / 'beam-temp-embeddings-006bf72aed6911f1826502fc00000001'
  temp.mkdir()
  (temp / 'part-0').write_bytes(b'partial')
  return output, temp


def _asking(jobs_url: str) -> PipelineOptions:
  return PipelineOptions([f'--dataflow_endpoint={jobs_url}', '--no_auth'])


@pytest.mark.parametrize('state', ['JOB_STATE_RUNNING', 'JOB_STATE_PENDING',
                                   'JOB_STATE_CANCELLING'])
def test_a_stale_run_whose_job_still_runs_is_left_alone(state, stale_dataflow_run):
  output, temp = stale_dataflow_run
  jobs = _DataflowJobs(state)
  try:
    with pytest.raises(OutputExistsError) as refused:
      claim_output(output, {'run': 2}, _asking(jobs.url), clean_unfinished=True)
  finally:
    jobs.stop()
  message = str(refused.value)
  assert f'Dataflow job 2026-12-08_01_02_03-42 (project photos, region europe-west4) is still ' \
         f'{state}' in message
  assert 'gcloud dataflow jobs cancel 2026-12-08_01_02_03-42' in message and '\n' not in message
  assert jobs.asked == ['/v1b3/projects/photos/locations/europe-west4/jobs/'
                        '2026-12-08_01_02_03-42']
  assert (temp / 'part-0').exists()
  assert run_dirs._read_claim(output)['host'] == 'a-laptop'  # pylint: disable=protected-access


@pytest.mark.parametrize('state', ['JOB_STATE_DONE', 'JOB_STATE_FAILED', 'JOB_STATE_CANCELLED'])
def test_a_stale_run_whose_job_ended_is_cleaned(state, stale_dataflow_run):
  output, temp = stale_dataflow_run
  jobs = _DataflowJobs(state)
  try:
    deleted = claim_output(output, {'run': 2}, _asking(jobs.url), clean_unfinished=True)
  finally:
    jobs.stop()
  assert f'{temp}/' in deleted and not temp.exists()
  assert run_dirs._read_claim(output)['run'] == 2  # pylint: disable=protected-access


def test_a_stale_run_whose_job_cannot_be_asked_is_kept_until_named_as_ended(stale_dataflow_run):
  output, temp = stale_dataflow_run
  jobs = _DataflowJobs('JOB_STATE_DONE')
  jobs.stop()  # nothing answers there any more
  with pytest.raises(OutputExistsError) as refused:
    claim_output(output, {'run': 2}, _asking(jobs.url), clean_unfinished=True)
  message = str(refused.value)
  assert 'could not be asked whether its Dataflow job 2026-12-08_01_02_03-42' in message
  assert 'ConnectionError' in message and 'its files are not deleted' in message.lower()
  assert '--clean_unfinished --ended_job=2026-12-08_01_02_03-42' in message
  assert (temp / 'part-0').exists()
  with pytest.raises(OutputExistsError, match='could not be asked'):  # another job named: kept
    claim_output(output, {'run': 2}, _asking(jobs.url), clean_unfinished=True,
                 ended_job='2026-12-07_01_02_03-41')
  deleted = claim_output(output, {'run': 2}, _asking(jobs.url), clean_unfinished=True,
                         ended_job='2026-12-08_01_02_03-42')
  assert f'{temp}/' in deleted and not temp.exists()
