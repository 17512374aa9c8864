"""A run's Dataflow job: recorded in its claim once submitted, and asked for its state before a
later launch deletes what the run left, so that a run whose heartbeat has stopped is cleaned only
once Dataflow says its job has ended. Its heartbeat alone says too little: every worker that
beat may have stopped for a while, and a store's clock or a stalled write can make a live run
look an hour old.
"""

import logging
from typing import NamedTuple, Optional

from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from transforms import heartbeat

# The claim's key for the job: {"id", "project", "region"}.
CLAIM_KEY = 'dataflow_job'
# The states in which a job does nothing more (Dataflow's JobState names).
ENDED_STATES = ('JOB_STATE_DONE', 'JOB_STATE_FAILED', 'JOB_STATE_CANCELLED', 'JOB_STATE_DRAINED')
TIMEOUT_SECONDS = 30


class JobStateUnknown(Exception):
  """Dataflow could not be asked, or would not say, what state a job is in."""


class DataflowJob(NamedTuple):
  id: str
  project: str
  region: str

  @classmethod
  def from_claim(cls, claim: dict) -> Optional['DataflowJob']:
    job = claim.get(CLAIM_KEY)
    if not isinstance(job, dict) or not job.get('id'):
      return None
    return cls(str(job['id']), str(job.get('project')), str(job.get('region')))

  def __str__(self) -> str:
    return f'Dataflow job {self.id} (project {self.project}, region {self.region})'

  def gcloud(self, verb: str) -> str:
    return f'gcloud dataflow jobs {verb} {self.id} --project={self.project} --region={self.region}'


def record_job(output: str, job_id: str, options: PipelineOptions) -> None:
  """Writes the job just submitted to Dataflow into the run's claim, before any worker beats:
  Dataflow's workers start minutes after submission."""
  cloud = options.view_as(GoogleCloudOptions)
  job = {'id': job_id, 'project': cloud.project, 'region': cloud.region}
  try:
    heartbeat.update_claim(output, **{CLAIM_KEY: job})
  except Exception as exc:  # pylint: disable=broad-except; the job runs either way
    logging.warning('could not record Dataflow job %s in %s\'s claim (%s): a later launch into '
                    'it can judge the run by its heartbeat only', job['id'], output, exc)


def job_state(job: DataflowJob, options: PipelineOptions) -> str:
  """The job's state as Dataflow names it (JOB_STATE_RUNNING, JOB_STATE_DONE...), from its REST
  API (projects.locations.jobs.get) at --dataflow_endpoint, with the launch's credentials (none
  with --no_auth); JobStateUnknown says why it cannot be told."""
  from apache_beam.internal.gcp.auth import get_service_credentials
  from google.api_core.client_options import ClientOptions
  from google.auth.credentials import AnonymousCredentials
  from google.cloud import dataflow
  cloud = options.view_as(GoogleCloudOptions)
  try:
    credentials = None if cloud.no_auth else get_service_credentials(options)
    client = dataflow.JobsV1Beta3Client(
        credentials=credentials or AnonymousCredentials(), transport='rest',
        client_options=ClientOptions(api_endpoint=cloud.dataflow_endpoint))
    found = client.get_job(
        dataflow.GetJobRequest(project_id=job.project, location=job.region, job_id=job.id,
                               view=dataflow.JobView.JOB_VIEW_SUMMARY),
        timeout=TIMEOUT_SECONDS)
  except Exception as exc:  # pylint: disable=broad-except; no network, no access, no such job
    raise JobStateUnknown(f'{type(exc).__name__}: {" ".join(str(exc).split())[:200]}') from exc
  state = found.current_state.name
  if state == 'JOB_STATE_UNKNOWN':
    raise JobStateUnknown(f'Dataflow answers {state}')
  return state
