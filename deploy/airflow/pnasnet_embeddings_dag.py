"""Nightly PNASNet-5 embeddings on Dataflow from the Flex Template (Cloud Composer, Airflow 3), and
the first backfill in chunks.

Copy this file into the environment's dags/ folder after setting PROJECT, REGION and PARAMS below
(the params can also be overridden when triggering). Each night's run writes to
OUTPUT_ROOT/<logical date>, so a re-run of the same night is refused by the pipeline rather than
mixed into it, and a backfill writes each night to its own directory; every night commits to one
collection (params.collection, created by the first night), so each embeds only new and changed
images and removes the rows of deleted ones, in one commit. The launch task only submits
(the template never waits); the next task waits for the job without holding a worker slot; then one
waits for its run_summary.json, which the pipeline writes last, after every output file, and the
last one reads the summary's outcome: "finished" passes (the night committed), and
"too_many_failures" (more than --max_failed_fraction of the matched images were dead-lettered:
`pnasnet-embeddings embed`'s exit 3, nothing committed) or "failed" (another night committed to
the collection first: exit 1, nothing committed) fail the DAG run, as a failed job does. A few
bad images in a night do not fail it; they are listed in the run's failures-*.jsonl.

The sensor waits as long as the documented estimate says a job of at most IMAGES_PER_NIGHT new
images takes (docs/dataflow.md, "Which GPU and machine": 0.42 hours per 1M images on 8 L4
workers, plus 10 minutes to start), twice over; past that `wait_for_job` fails and
`cancel_on_timeout` cancels the job, so no night runs into the next; were two to overlap anyway,
the collection refuses the later one's commit, so neither undoes the other.

`pnasnet_embeddings_backfill` (triggered by hand, once) embeds a first collection in CHUNKS jobs
of IMAGES_PER_CHUNK images each, one after the other, from manifests
`<backfill_manifests>/chunk-000.txt.gz`, ... (`gcloud storage ls ... | split`, docs/running.md);
each writes `<output prefix>/backfill-chunk-NNN` and is one commit to the collection, so a
failure costs one chunk: clear the failed chunk's tasks and it runs again (`skip_if_finished`
passes over the chunks done, `clean_unfinished` deletes what the dead attempt left, and it skips
what the committed chunks hold). A manifest removes nothing it does not name, so chunks never undo
each other. Pause the nightly DAG until the backfill is done: a night committing meanwhile would
make the chunk running then fail (outcome "failed", its directory written: delete that directory,
then clear the chunk's tasks to run it again).
"""

import datetime
import json

from airflow.providers.google.cloud.hooks.gcs import GCSHook
from airflow.providers.google.cloud.operators.dataflow import (DataflowStartFlexTemplateOperator,
                                                               DataflowStopJobOperator)
from airflow.providers.google.cloud.sensors.dataflow import DataflowJobStatusSensor
from airflow.providers.google.cloud.sensors.gcs import GCSObjectExistenceSensor
from airflow.sdk import DAG, task
from airflow.sdk.exceptions import AirflowFailException

PROJECT = 'my-project'
REGION = 'us-central1'
# The images: `input` (a pattern, listed by the job) or `input_manifest` (files naming one URI a
# line, never listed: at 100M objects, a list the storage service writes, see docs), or both.
PARAMS = {
    'template': 'gs://my-bucket/templates/pnasnet-embeddings.json',
    'input': 'gs://my-bucket/photos/**.jpg',
    # 'input_manifest': 'gs://my-bucket/manifests/{{ ds }}/*.txt.gz',
    'output_bucket': 'my-bucket',
    'output_prefix': 'embeddings',
    'model': 'builtin:pnasnet_large',
    'checkpoint': 'gs://my-bucket/pnasnet-5_large_2017_12_13/model.ckpt',
    'temp_location': 'gs://my-bucket/tmp',
    'machine_type': 'n1-standard-4',  # the CPU workers: matching, writing, the summary
    # The collection every night and chunk commits to (docs/running.md, "Nightly").
    'collection': 'gs://my-bucket/collection',
}
OUTPUT = 'gs://{{ params.output_bucket }}/{{ params.output_prefix }}/{{ ds }}'
# Only the image parameters PARAMS gives: the template refuses an empty one.
IMAGES = {name: f'{{{{ params.{name} }}}}' for name in ('input', 'input_manifest')
          if PARAMS.get(name)}

# The documented estimate (docs/dataflow.md, sizing table, nvidia-l4 on 8 workers) and the bounds
# of one job: a night's new images, a backfill chunk's images.
HOURS_PER_MILLION_IMAGES = 0.42
STARTUP_HOURS = 10 / 60
TIMEOUT_FACTOR = 2.0
IMAGES_PER_NIGHT = 2_000_000
IMAGES_PER_CHUNK = 5_000_000  # about 2.1 hours a chunk on 8 workers
CHUNKS = 20  # 100M images
BACKFILL_MANIFESTS = 'gs://my-bucket/manifests/backfill'


def job_timeout_seconds(images: int) -> int:
  """How long a job of `images` may run before it is cancelled: the estimate, twice."""
  return round((STARTUP_HOURS + images / 1e6 * HOURS_PER_MILLION_IMAGES) * TIMEOUT_FACTOR * 3600)


# What every launch sends beside its images and output.
COMMON_PARAMETERS = {
    'model': '{{ params.model }}',
    'checkpoint': '{{ params.checkpoint }}',
    # Only what the collection does not hold (new or changed files), committed to it.
    'collection': '{{ params.collection }}',
    # GPU workers (an L4 on a G2 machine) read, decode and embed; matching and writing run on
    # the job's CPU workers (machine_type below).
    'inference_accelerator': ('type:nvidia-l4;count:1;machine_type:g2-standard-8;'
                              'install-nvidia-driver'),
    'large_model': 'true',
    'max_batch_size': '64',
}
ENVIRONMENT = {
    'tempLocation': '{{ params.temp_location }}',
    'machineType': '{{ params.machine_type }}',
    'maxWorkers': 8,
    'diskSizeGb': 50,  # the worker image is ~10 GB; a batch job's default disk is 25 GB
}


@task(task_id='run_outcome_finished', retries=0)
def run_outcome_finished(bucket: str, summary_object: str) -> dict:
  """Fails the DAG run unless the job's own summary says the run finished within its failure
  bound; the counts go to XCom."""
  summary = json.loads(GCSHook().download(bucket_name=bucket, object_name=summary_object))
  counts = {key: summary.get(key) for key in ('outcome', 'matched', 'embedded', 'skipped',
                                              'failed', 'max_failed_fraction',
                                              'collection_version', 'collection_removed')}
  if summary.get('outcome') != 'finished':
    raise AirflowFailException(f'gs://{bucket}/{summary_object}: outcome '
                               f'{summary.get("outcome")!r}, not "finished": {counts}'
                               + (f'; {summary["outcome_message"]}'
                                  if summary.get('outcome_message') else ''))
  return counts


def run_tasks(prefix: str, job_name: str, parameters: dict, output_object: str,
              images: int) -> tuple:
  """launch >> wait_for_job >> run_summary_written >> run_outcome_finished, and
  cancel_on_timeout after wait_for_job when it fails (timed out, or the job failed): one job."""
  launch = DataflowStartFlexTemplateOperator(
      task_id=f'{prefix}launch',
      project_id=PROJECT,
      location=REGION,
      body={'launchParameter': {
          'jobName': job_name,
          'containerSpecGcsPath': '{{ params.template }}',
          'parameters': {**parameters, **COMMON_PARAMETERS},
          'environment': ENVIRONMENT,
      }},
      wait_until_finished=False,
      append_job_name=False,  # the job name already says which night or chunk
  )
  job_id = f"{{{{ task_instance.xcom_pull(task_ids='{prefix}launch', key='job_id') }}}}"
  wait = DataflowJobStatusSensor(
      task_id=f'{prefix}wait_for_job',
      project_id=PROJECT,
      location=REGION,
      job_id=job_id,
      expected_statuses={'JOB_STATE_DONE'},
      mode='reschedule',
      poke_interval=300,
      timeout=job_timeout_seconds(images),
  )
  cancel = DataflowStopJobOperator(
      task_id=f'{prefix}cancel_on_timeout',
      project_id=PROJECT,
      location=REGION,
      job_id=job_id,
      drain_pipeline=False,  # a batch job is cancelled
      trigger_rule='one_failed',
  )
  summary = GCSObjectExistenceSensor(
      task_id=f'{prefix}run_summary_written',
      bucket='{{ params.output_bucket }}',
      object=output_object + '/run_summary.json',
      mode='reschedule',
      poke_interval=60,
      timeout=3600,
  )
  outcome = run_outcome_finished.override(task_id=f'{prefix}run_outcome_finished')(
      '{{ params.output_bucket }}', output_object + '/run_summary.json')
  launch >> wait >> summary >> outcome
  wait >> cancel
  return launch, outcome


with DAG(
    dag_id='pnasnet_embeddings_nightly',
    description='PNASNet-5 embeddings of the photo bucket, one Dataflow job a night',
    schedule='0 2 * * *',
    start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=['dataflow', 'embeddings'],
) as dag:
  run_tasks('', 'pnasnet-embeddings-{{ ds_nodash }}', {**IMAGES, 'output': OUTPUT},
            '{{ params.output_prefix }}/{{ ds }}', IMAGES_PER_NIGHT)


with DAG(
    dag_id='pnasnet_embeddings_backfill',
    description=f'The first backfill in {CHUNKS} chunks of {IMAGES_PER_CHUNK} images, one '
    'Dataflow job each, one after the other',
    schedule=None,
    start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    catchup=False,
    max_active_runs=1,
    params=dict(PARAMS, backfill_manifests=BACKFILL_MANIFESTS),
    tags=['dataflow', 'embeddings', 'backfill'],
) as backfill:
  previous = None
  for chunk in range(CHUNKS):
    name = f'backfill-chunk-{chunk:03d}'
    first, last = run_tasks(
        f'chunk_{chunk:03d}_', f'pnasnet-embeddings-{name}',
        {'input_manifest': f'{{{{ params.backfill_manifests }}}}/chunk-{chunk:03d}.txt.gz',
         'output': f'gs://{{{{ params.output_bucket }}}}/{{{{ params.output_prefix }}}}/{name}',
         'skip_if_finished': 'true', 'clean_unfinished': 'true'},
        f'{{{{ params.output_prefix }}}}/{name}', IMAGES_PER_CHUNK)
    if previous is not None:
      previous >> first
    previous = last
