"""Imports deploy/airflow's DAG with real Airflow (run inside Airflow's own venv: check_dag.sh).

Fails when the DagBag has import errors, when the DAG or its tasks are missing, when a task holds a
Jinja template in a field Airflow does not render, or when the launch sends a template parameter
that deploy/flex/metadata.json does not declare (Dataflow validates launch parameters against the
template's metadata).
"""

import json
import os
import sys

from airflow.dag_processing.dagbag import DagBag

DAG_ID = 'pnasnet_embeddings_nightly'
TASKS = {'launch', 'wait_for_job', 'run_summary_written', 'run_outcome_finished'}


def main() -> int:
  here = os.path.dirname(os.path.abspath(__file__))
  bag = DagBag(dag_folder=os.path.join(here, 'pnasnet_embeddings_dag.py'), safe_mode=False)
  problems = [f'import error in {path}:\n{error}' for path, error in bag.import_errors.items()]
  dag = bag.dags.get(DAG_ID)
  if dag is None:
    problems.append(f'no DAG {DAG_ID!r}; found {sorted(bag.dags)}')
  else:
    if set(dag.task_ids) != TASKS:
      problems.append(f'tasks {sorted(dag.task_ids)}, expected {sorted(TASKS)}')
    for task in dag.tasks:  # Airflow renders templates in template_fields only
      for name, value in vars(task).items():
        if isinstance(value, str) and '{{' in value and name not in task.template_fields:
          problems.append(f'{task.task_id}.{name} = {value!r} is never rendered: it is not one '
                          f'of the template fields {list(task.template_fields)}')
    with open(os.path.join(here, '..', 'flex', 'metadata.json')) as f:
      declared = {p['name'] for p in json.load(f)['parameters']}
    sent = set(dag.get_task('launch').body['launchParameter']['parameters'])
    if sent - declared:
      problems.append(f'the launch sends parameters that metadata.json does not declare: '
                      f'{sorted(sent - declared)}')
  if problems:
    print('\n'.join(problems), file=sys.stderr)
    return 1
  print(f'DagBag: {len(bag.dags)} DAG ({DAG_ID}), tasks {sorted(dag.task_ids)}, no import errors')
  return 0


if __name__ == '__main__':
  sys.exit(main())
