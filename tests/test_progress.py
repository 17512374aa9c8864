"""Progress lines a person can read: done of the run's total, the rate, the time left and a bar
when the whole run is in one process; a worker process's share elsewhere."""

import logging
import re

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.build import _one_process_embeds
from pipeline.launcher import run
from pipeline.options import EmbeddingOptions
from transforms.progress import ProgressReporter, progress_line

TINY = '--model=builtin:pnasnet_tiny'


def test_the_line_says_done_of_total_the_rate_and_the_time_left():
  assert progress_line(1234, 100_000, 600, whole_run=True) == (
      '1,234/100,000 images (1%) in 10 min 00 s, 2.06/s, about 13 h 20 min left')
  assert progress_line(30, 40, 15, whole_run=True, bar_width=8) == (
      '[######..] 30/40 images (75%) in 15 s, 2.00/s, about 5 s left')
  assert progress_line(0, 40, 35, whole_run=True, bar_width=4) == (
      '[....] 0/40 images (0%) in 35 s, 0.00/s, time left not known yet')
  assert progress_line(40, 40, 3725, whole_run=True) == (
      '40/40 images (100%) in 1 h 02 min, 0.01/s, none left')
  assert progress_line(5_000, 1_000_000, 100, whole_run=False, bar_width=20) == (
      'this worker process: 5,000 images in 1 min 40 s (50/s), 0% of the run\'s 1,000,000')
  assert progress_line(3, None, 0.5, whole_run=True) == 'embedded 3 images in 0 s (6.00/s)'


def test_only_the_local_runner_in_one_process_has_the_whole_run():
  def whole(*flags):
    return _one_process_embeds(PipelineOptions(list(flags)).view_as(EmbeddingOptions))

  assert whole() and whole('--direct_running_mode=multi_threading')
  assert not whole('--direct_running_mode=multi_processing', '--direct_num_workers=2')
  assert not whole('--runner=DataflowRunner')


def test_a_real_run_counts_every_outcome_against_its_total(image_folder, tmp_path, monkeypatch,
                                                          caplog):
  """Embedded and failed images count as done; a second run in the process counts anew."""
  reporter = ProgressReporter(interval=0.2)
  monkeypatch.setattr(ProgressReporter, '_instance', reporter)
  with caplog.at_level(logging.INFO):
    run([f'--input={image_folder}', TINY, f'--output={tmp_path}/all', '--max_batch_size=2'])
  assert re.fullmatch(r'9/9 images \(100%\) in \d+ s, [\d.]+/s, none left', reporter.line())
  logged = [r.getMessage() for r in caplog.records  # not an earlier test's reporter's lines
            if r.getMessage().startswith('progress: ') and r.thread == reporter._thread.ident]  # pylint: disable=protected-access
  assert all(re.fullmatch(r'progress: (\d/9 images .*|embedded 0 images .*)', line)
             for line in logged), logged
  run([f'--input={image_folder}/*.png', TINY, f'--output={tmp_path}/png'])
  assert reporter.line(bar_width=4).startswith('[####] 4/4 images (100%)')
