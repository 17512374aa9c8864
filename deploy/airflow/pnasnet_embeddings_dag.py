"""Nightly PNASNet-5 embeddings on Dataflow from the Flex Template (Cloud Composer, Airflow 3).

Copy this file into the environment's dags/ folder after setting PROJECT, REGION and PARAMS below
(the params can also be overridden when triggering). Each night's run writes to
OUTPUT_ROOT/<logical date>, so a re-run of the same night is refused by the pipeline rather than
mixed into it, and a backfill writes each night to its own directory; --incremental_from over the
earlier nights makes each night embed only new and changed images. The launch task only submits
(the template never waits); the next task waits for the job without holding a worker slot; then one
waits for its run_summary.json, which the pipeline writes last, after every output file, and the
last one reads the summary's outcome: "finished" passes, "too_many_failures" (more than
--max_failed_fraction of the matched images were dead-lettered, the launcher's exit 3) fails the
DAG run, as a failed job does. A few bad images in a night do not fail it; they are listed in the
run's failures-*.jsonl.
"""

import datetime
import json

from airflow.providers.google.cloud.hooks.gcs import GCSHook
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator
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
}
OUTPUT = 'gs://{{ params.output_bucket }}/{{ params.output_prefix }}/{{ ds }}'
# Only the image parameters PARAMS gives: the template refuses an empty one.
IMAGES = {name: f'{{{{ params.{name} }}}}' for name in ('input', 'input_manifest')
          if PARAMS.get(name)}
SUMMARY_OBJECT = '{{ params.output_prefix }}/{{ ds }}/run_summary.json'


@task(task_id='run_outcome_finished', retries=0)
def run_outcome_finished(bucket: str, summary_object: str) -> dict:
  """Fails the DAG run unless the job's own summary says the run finished within its failure
  bound; the counts go to XCom."""
  summary = json.loads(GCSHook().download(bucket_name=bucket, object_name=summary_object))
  counts = {key: summary.get(key) for key in ('outcome', 'matched', 'embedded', 'skipped',
                                              'failed', 'max_failed_fraction')}
  if summary.get('outcome') != 'finished':
    raise AirflowFailException(f'gs://{bucket}/{summary_object}: outcome '
                               f'{summary.get("outcome")!r}, not "finished": {counts}')
  return counts


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
  launch = DataflowStartFlexTemplateOperator(
      task_id='launch',
      project_id=PROJECT,
      location=REGION,
      body={'launchParameter': {
          'jobName': 'pnasnet-embeddings-{{ ds_nodash }}',
          'containerSpecGcsPath': '{{ params.template }}',
          'parameters': {
              **IMAGES,
              'output': OUTPUT,
              'model': '{{ params.model }}',
              'checkpoint': '{{ params.checkpoint }}',
              # Only what earlier finished nights did not embed (new or changed files).
              'incremental_from': 'gs://{{ params.output_bucket }}/{{ params.output_prefix }}/*',
              'allow_no_earlier_runs': 'true',  # the first night has no earlier run
              # GPU workers (an L4 on a G2 machine) read, decode and embed; matching and writing
              # run on the job's CPU workers (machine_type below).
              'inference_accelerator': ('type:nvidia-l4;count:1;machine_type:g2-standard-8;'
                                        'install-nvidia-driver'),
              'large_model': 'true',
              'max_batch_size': '64',
          },
          'environment': {
              'tempLocation': '{{ params.temp_location }}',
              'machineType': '{{ params.machine_type }}',
              'maxWorkers': 8,
              'diskSizeGb': 50,  # the worker image is ~10 GB; a batch job's default disk is 25 GB
          },
      }},
      wait_until_finished=False,
      append_job_name=False,  # the job name already carries the date
  )
  wait = DataflowJobStatusSensor(
      task_id='wait_for_job',
      project_id=PROJECT,
      location=REGION,
      job_id="{{ task_instance.xcom_pull(task_ids='launch', key='job_id') }}",
      expected_statuses={'JOB_STATE_DONE'},
      mode='reschedule',
      poke_interval=300,
      timeout=24 * 3600,
  )
  summary = GCSObjectExistenceSensor(
      task_id='run_summary_written',
      bucket='{{ params.output_bucket }}',
      object=SUMMARY_OBJECT,
      mode='reschedule',
      poke_interval=60,
      timeout=3600,
  )
  outcome = run_outcome_finished('{{ params.output_bucket }}', SUMMARY_OBJECT)
  launch >> wait >> summary >> outcome
