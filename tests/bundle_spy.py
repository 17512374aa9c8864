"""Where a method is called from: inside a Beam bundle (a worker's work, however many workers
there are) or by the launcher's own code, where a cost that grows with the collection sits in
one process."""

import inspect
from typing import Dict


def calls_by_place(monkeypatch, owner, name: str) -> Dict[str, int]:
  """Spies on `owner.name`; the returned counts fill as it is called."""
  calls = {'in a bundle': 0, 'in the launcher': 0}
  method = getattr(owner, name)

  def called(*args, **kwargs):
    in_bundle = any(frame.filename.endswith('bundle_processor.py') for frame in inspect.stack())
    calls['in a bundle' if in_bundle else 'in the launcher'] += 1
    return method(*args, **kwargs)
  monkeypatch.setattr(owner, name, called)
  return calls
