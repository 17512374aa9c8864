"""`run_summary.json` as a typed record: what the run was (RunLaunch, also the claim's content),
then what it did (RunSummary adds the counts). The JSON keys are the field names, in this order."""

import dataclasses
import datetime
import json
from typing import Dict, List, Optional, Union

from run_format.layout import FINISHED, SUMMARY_FILE


class IncompatibleRunError(ValueError):
  """A summary without the fields that every run since 0.2.0 has: an older or a foreign file."""


def utc_now() -> str:
  """The summary's timestamps: ISO 8601, UTC, milliseconds."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='milliseconds')


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunLaunch:
  """Known at launch, before any work."""
  model: str  # the model id recorded in every Example and index row
  model_handle: str  # as the user gave it
  checkpoint: Optional[str]
  seed: Optional[int]  # None with a checkpoint
  weights: str
  compute_dtype: str
  center_crop_fraction: float
  jpeg_draft: bool
  jit_compile: bool = False  # absent from the first 0.2.0 summaries
  # How the vectors are stored (run_format.EMBEDDING_DTYPES); absent before --embedding_dtype.
  embedding_dtype: str = 'float32'
  recipe: str
  pipeline_version: str
  embedding_size: int
  image_size: List[int]  # [height, width]
  input: List[str]
  input_manifest: List[str]
  exclude: List[str] = dataclasses.field(default_factory=list)  # --exclude patterns
  # --collection: the collection this night skips against and commits to, and the version it
  # read at launch (what it skipped against). Absent before the collection.
  collection: Optional[str] = None
  collection_read_version: Optional[int] = None
  output: str
  output_format: str
  max_failed_fraction: Optional[float] = None  # absent from older summaries
  runner: str
  started_at: str

  def to_dict(self) -> Dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSummary(RunLaunch):
  """Counted from the data by the job's last step."""
  outcome: str = FINISHED  # or TOO_MANY_FAILURES; absent before 0.3.0
  matched: int
  skipped: int
  # Files that folder and glob inputs left out by name (hidden, or an extension that is never an
  # image's): not matched. Absent before --include_all_files (those runs skipped none).
  skipped_by_name: int = 0
  embedded: int
  failed: int
  failed_by_stage: Dict[str, int]  # every one of layout.STAGES
  example_failures: List[Dict]  # up to a few failure records, as in failures-*.jsonl
  files: List[str]  # every file the run wrote but the summary
  finished_at: str
  wall_time_seconds: float
  images_per_second: Optional[float]
  # The version this night committed to --collection (None: nothing committed, as for a night
  # over the limit of failures, or refused by another night's commit), its rows added and removed.
  collection_version: Optional[int] = None
  collection_added: int = 0
  collection_removed: int = 0
  # Why the outcome is `failed` (the run did its work, but its commit was refused).
  outcome_message: Optional[str] = None

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_json(cls, text: Union[str, bytes], source: str = SUMMARY_FILE) -> 'RunSummary':
    """Fields a later version added are ignored; missing ones are refused, but for those with a
    default (added since 0.2.0), which take it."""
    fields = json.loads(text)
    known = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(fields))
    if missing:
      raise IncompatibleRunError(
          f'{source}: not a run summary of pnasnet-embeddings 0.2.0 or later (no '
          f'{", ".join(missing)}); embed the images again with this version')
    return cls(**{name: value for name, value in fields.items() if name in known})

  @property
  def finished(self) -> datetime.datetime:
    """`finished_at` as a UTC datetime."""
    parsed = datetime.datetime.fromisoformat(self.finished_at.replace('Z', '+00:00'))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)
