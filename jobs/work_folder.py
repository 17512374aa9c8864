"""The folder a Beam job's workers write their intermediate files to and the launcher reads back
(the duplicates' samples and spills, the export's plan): under --temp_location when given (where
Dataflow's workers share files), else a local temporary folder; removed after the job."""

import tempfile
import uuid
from typing import Sequence, Tuple

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import MetricsFilter
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions,
                                                  StandardOptions)

import storage


class WorkDirectoryError(ValueError):
  """A runner whose workers cannot share a local folder, and no --temp_location."""


def check_options(beam_flags: Sequence[str], files: str) -> None:
  """`files`: what the workers write there, for the message."""
  options = PipelineOptions(list(beam_flags))
  runner = options.view_as(StandardOptions).runner or 'DirectRunner'
  if runner not in ('DirectRunner', 'direct') and not options.view_as(
      GoogleCloudOptions).temp_location:
    raise WorkDirectoryError(f'--runner {runner} needs --temp_location (e.g. gs://bucket/tmp): '
                             f'the workers write and read {files} there')


def work_directory(options: PipelineOptions, prefix: str) -> Tuple[str, bool]:
  """(a new folder for the job's files, whether it is a local folder this made)."""
  temp_location = options.view_as(GoogleCloudOptions).temp_location
  if temp_location:
    return storage.join(temp_location, f'{prefix}-{uuid.uuid4().hex}'), False
  return tempfile.mkdtemp(prefix=f'{prefix}-'), True


def remove(directory: str, local: bool) -> None:
  """Removes the files the job wrote there, and nothing else."""
  if local:
    import shutil
    shutil.rmtree(directory, ignore_errors=True)
    return
  written = [f.path for f in storage.match(storage.join(directory, '*'))]
  if written:
    FileSystems.delete(written)


def counter(result, name: str, namespace: str, required: bool = False) -> int:
  """A counter's committed value (attempted where the runner commits none) after the job;
  `required`: the job always increments it, so a runner reporting none is refused rather than
  read as 0."""
  found = result.metrics().query(MetricsFilter().with_namespace(namespace).with_name(name)
                                 )['counters']
  if required and not found:
    raise RuntimeError(f'the runner reported no {namespace}/{name} counter, which this job '
                       f'needs: run it on a runner that reports Beam metrics (the local '
                       f'FnApiRunner, Dataflow)')
  return int(sum(c.committed or c.attempted or 0 for c in found))
