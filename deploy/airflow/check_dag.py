"""Imports deploy/airflow's DAGs with real Airflow (run inside Airflow's own venv: check_dag.sh).

Fails when the DagBag has import errors, when a DAG or its tasks are missing, when a task holds a
Jinja template in a field Airflow does not render, when a launch sends a template parameter that
deploy/flex/metadata.json does not declare (Dataflow validates launch parameters against the
template's metadata), or when a job's sensor does not time out at the documented estimate for
its images (twice over) with a cancel behind it.
"""

import importlib.util
import json
import os
import sys

from airflow.dag_processing.dagbag import DagBag

NIGHTLY, BACKFILL = 'pnasnet_embeddings_nightly', 'pnasnet_embeddings_backfill'
JOB_TASKS = ('launch', 'wait_for_job', 'cancel_on_timeout', 'run_summary_written',
             'run_outcome_finished')


def expected_tasks(module) -> dict:
  return {NIGHTLY: {'': module.IMAGES_PER_NIGHT},
          BACKFILL: {f'chunk_{chunk:03d}_': module.IMAGES_PER_CHUNK
                     for chunk in range(module.CHUNKS)}}


def main() -> int:
  here = os.path.dirname(os.path.abspath(__file__))
  path = os.path.join(here, 'pnasnet_embeddings_dag.py')
  bag = DagBag(dag_folder=path, safe_mode=False)
  problems = [f'import error in {path}:\n{error}' for path, error in bag.import_errors.items()]
  with open(os.path.join(here, '..', 'flex', 'metadata.json')) as f:
    declared = {p['name'] for p in json.load(f)['parameters']}
  spec = importlib.util.spec_from_file_location('pnasnet_embeddings_dag', path)
  module = importlib.util.module_from_spec(spec)  # its constants: the estimate and the bounds
  spec.loader.exec_module(module)
  for dag_id, jobs in expected_tasks(module).items():
    dag = bag.dags.get(dag_id)
    if dag is None:
      problems.append(f'no DAG {dag_id!r}; found {sorted(bag.dags)}')
      continue
    wanted = {prefix + task for prefix in jobs for task in JOB_TASKS}
    if set(dag.task_ids) != wanted:
      problems.append(f'{dag_id}: tasks {sorted(dag.task_ids)}, expected {sorted(wanted)}')
      continue
    for task in dag.tasks:  # Airflow renders templates in template_fields only
      for name, value in vars(task).items():
        if isinstance(value, str) and '{{' in value and name not in task.template_fields:
          problems.append(f'{task.task_id}.{name} = {value!r} is never rendered: it is not one '
                          f'of the template fields {list(task.template_fields)}')
    for prefix, images in jobs.items():
      sent = set(dag.get_task(prefix + 'launch').body['launchParameter']['parameters'])
      if sent - declared:
        problems.append(f'{prefix}launch sends parameters that metadata.json does not '
                        f'declare: {sorted(sent - declared)}')
      timeout = dag.get_task(prefix + 'wait_for_job').timeout
      seconds = timeout.total_seconds() if hasattr(timeout, 'total_seconds') else timeout
      if seconds != module.job_timeout_seconds(images):
        problems.append(f'{prefix}wait_for_job times out after {seconds} s, not the estimate '
                        f'for {images} images twice over')
      cancel = dag.get_task(prefix + 'cancel_on_timeout')
      if (cancel.trigger_rule != 'one_failed' or
          prefix + 'wait_for_job' not in cancel.upstream_task_ids):
        problems.append(f'{prefix}cancel_on_timeout does not follow a failed wait_for_job')
  if problems:
    print('\n'.join(problems), file=sys.stderr)
    return 1
  print(f'DagBag: {len(bag.dags)} DAGs ({", ".join(sorted(bag.dags))}), '
        f'{sum(len(d.task_ids) for d in bag.dags.values())} tasks, no import errors')
  return 0


if __name__ == '__main__':
  sys.exit(main())
