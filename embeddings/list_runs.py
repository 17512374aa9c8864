"""Run directories and their state: finished (and its outcome) or unfinished (and who holds the
claim), with the counts and the model (`pnasnet-embeddings runs`).

`exit_code`: 0 when every listed run finished with outcome "finished", 3 when one finished with
more failures than its --max_failed_fraction allowed, 1 when one ended "failed" (its commit to the
collection refused) or is unfinished (claimed, no summary: running, interrupted or failed), 2 when
the arguments name no run directory at all; so a scheduler can check a night's run with the run's
directory as the argument.

An unfinished run is `running` or `dead` by the launcher's rule (storage.run_dirs.Unfinished).
"""

import json
from typing import Dict, List, NamedTuple, Optional, Sequence

import storage
from run_format import CLAIM_FILE, FAILED, FINISHED, SUMMARY_FILE, TOO_MANY_FAILURES
from storage.run_dirs import Unfinished

UNFINISHED = 'unfinished'
COUNTS = ('matched', 'embedded', 'skipped', 'failed')
EXIT_CODES = {FINISHED: 0, TOO_MANY_FAILURES: 3, FAILED: 1, UNFINISHED: 1}


class RunState(NamedTuple):
  run: str  # the run directory
  state: str  # the summary's outcome ("finished", "too_many_failures"), or "unfinished"
  counts: Dict[str, Optional[int]]
  model: Optional[str]
  note: str  # when it finished, or who claimed it and when

  def as_dict(self) -> dict:
    return dict({'run': self.run, 'state': self.state, 'model': self.model, 'note': self.note},
                **self.counts)


def _read_json(path: str) -> dict:
  try:
    return json.loads(storage.read_bytes(path))
  except (OSError, ValueError):  # unreadable or half-written: shown as unknown
    return {}


def _state(directory: str, has_summary: bool) -> RunState:
  if has_summary:
    summary = _read_json(storage.join(directory, SUMMARY_FILE))
    counts = {name: summary.get(name) for name in COUNTS}
    return RunState(directory, summary.get('outcome', FINISHED), counts, summary.get('model'),
                    f'finished {summary.get("finished_at", "?")}')
  claim = _read_json(storage.join(directory, CLAIM_FILE))
  alive = Unfinished(directory, claim).alive()
  return RunState(directory, UNFINISHED, dict.fromkeys(COUNTS), claim.get('model'),
                  f'claimed {claim.get("started_at", "?")} by {claim.get("host", "?")} pid '
                  f'{claim.get("pid", "?")}, last heartbeat {claim.get("heartbeat_at", "none")}: '
                  + ('running' if alive else 'dead (interrupted or failed)'))


def list_runs(patterns: Sequence[str]) -> List[RunState]:
  """Every directory among `patterns` (run directories or globs of them) that holds a claim or a
  summary, sorted by path."""
  found: Dict[str, bool] = {}
  for pattern in patterns:
    for name in (CLAIM_FILE, SUMMARY_FILE):
      for info in storage.match(storage.join(pattern, name)):
        directory = storage.dirname(info.path)
        found[directory] = found.get(directory, False) or name == SUMMARY_FILE
  return [_state(directory, found[directory]) for directory in sorted(found)]


def format_table(states: Sequence[RunState]) -> str:
  header = ('run', 'state') + COUNTS + ('model', 'note')
  rows = [header] + [(s.run, s.state) + tuple('-' if s.counts[n] is None else str(s.counts[n])
                                               for n in COUNTS) + (s.model or '-', s.note)
                     for s in states]
  widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
  return '\n'.join('  '.join(cell.ljust(width) for cell, width in zip(row, widths)) + '  ' +
                   row[-1] for row in rows)


def exit_code(states: Sequence[RunState]) -> int:
  """2 for no run; else the worst state's code, an unfinished run (nothing to read) first."""
  if not states:
    return 2
  codes = {EXIT_CODES.get(s.state, EXIT_CODES[UNFINISHED]) for s in states}
  return next((code for code in (1, 3) if code in codes), 0)
