"""Which runner a run gets when the command names none.

Beam 2.77's DirectRunner first tries the Prism runner, downloading its binary from GitHub
(`apache_beam/runners/direct/direct_runner.py`, `_PrismRunnerSupportVisitor`), and falls back to the
FnApiRunner when that fails: offline every run logs the failed download, online the same command
runs on Prism, another runner with its own worker environment. Without `--runner` this project
builds the FnApiRunner itself, as DirectRunner builds it in its fallback (the workers get the
pipeline's options through the provision info): the runner every test runs, in Beam's
`direct_running_mode`s `in_memory`, `multi_threading` and `multi_processing`, downloading nothing.
`--runner` names any other (PrismRunner, PortableRunner, FlinkRunner, SparkRunner, DataflowRunner).
"""

from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineRunner

LOCAL_RUNNER = 'FnApiRunner'


def runner_name(options: PipelineOptions) -> str:
  """What the run summary and the dry run call the runner."""
  return options.view_as(StandardOptions).runner or LOCAL_RUNNER


def default_runner(options: PipelineOptions) -> Optional[PipelineRunner]:
  """The local FnApiRunner when `--runner` names none; None lets Beam create the named one."""
  if options.view_as(StandardOptions).runner:
    return None
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  from apache_beam.runners.portability.portable_runner import JobServiceHandle
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))
