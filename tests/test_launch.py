"""The launcher: options refused before any work, the output claimed once, interruptions reported
in one line, Dataflow dry runs described, --no_wait, dated outputs, provenance recorded."""

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.launcher import run
from pipeline.options import OptionsError, expand_output
from pipeline.output_dir import OutputExistsError, OutputNotWritableError, claim_output
from pnasnet import build_model
from pnasnet.checkpoint import model_values, save_slim_checkpoint
from run_format import CLAIM_FILE
from tests.outputs import read_examples
from tests.test_pipeline import PROJECT

TINY = '--model=builtin:pnasnet_tiny'
OUTPUT_FORMAT_PAGE = os.path.join(PROJECT, 'docs', 'output-format.md')


def _cli(args, **kwargs):
  return subprocess.run([sys.executable, 'run_pipeline.py'] + args, cwd=PROJECT,
                        capture_output=True, text=True, **kwargs)


@pytest.mark.parametrize('args, error, message', [
    (['--seed=-1'], OptionsError, 'between 0 and'),
    (['--max_batchsize=8'], OptionsError, 'did you mean --max_batch_size'),
    (['--centre_crop_fraction=0.5'], OptionsError, 'did you mean --center_crop_fraction'),
    (['--collection='], OptionsError, '--collection is given an empty value'),
    (['--inference_accelerator=nvidia-l4'], OptionsError, 'expected "type:'),
    (['--inference_min_ram=lots'], OptionsError, 'inference_min_ram'),
    (['--output={output}/{{week}}'], OptionsError, 'unknown placeholder'),
    (['--inference_accelerator=type:nvidia-l4;count:1',
      '--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1'],
     OptionsError, 'cannot be combined'),
    (['--output=gs://missing-bucket-for-test/x'], OutputNotWritableError,
     'bucket gs://missing-bucket-for-test does not exist'),
])
def test_bad_options_fail_before_any_work(args, error, message, image_folder, tmp_path,
                                          gcs_server):
  output = tmp_path / 'out'
  argv = [f'--input={image_folder}/*.png', TINY]
  if not any(a.startswith('--output=') for a in args):
    argv.append(f'--output={output}')
  with pytest.raises(error, match=message):
    run(argv + [a.format(output=output) for a in args])
  assert not output.exists()


def test_an_output_that_is_a_file_is_refused(image_folder, tmp_path):
  (tmp_path / 'taken').write_text('a file')
  with pytest.raises(OutputNotWritableError, match='is a file'):
    run([f'--input={image_folder}/*.png', TINY, f'--output={tmp_path}/taken'])


def test_a_checkpoint_of_another_network_is_refused_once_and_briefly(image_folder, tmp_path):
  prefix = str(tmp_path / 'mobile' / 'model.ckpt')
  save_slim_checkpoint(prefix, {'cell_0/some/weights': np.zeros([3], np.float32)})
  result = _cli([f'--input={image_folder}/*.png', TINY, f'--checkpoint={prefix}',
                 f'--output={tmp_path}/out'])
  assert result.returncode == 2
  assert result.stderr.count('does not fit PNASNet') == 1
  assert 'more missing' in result.stderr and len(result.stderr) < 20_000
  assert not (tmp_path / 'out').exists()


def test_a_fitting_checkpoint_is_accepted_and_identified(image_folder, tmp_path):
  prefix = str(tmp_path / 'ckpt' / 'model.ckpt')
  save_slim_checkpoint(prefix, model_values(build_model('tiny', seed=5)))
  summary = run([f'--input={image_folder}/camera.png', TINY, f'--checkpoint={prefix}',
                 f'--output={tmp_path}/out'])
  assert summary['model'] == 'builtin:pnasnet_tiny'
  assert re.fullmatch(rf'checkpoint {re.escape(prefix)} index-sha256:[0-9a-f]{{16}}',
                      summary['weights'])


@pytest.mark.parametrize('store', ['local', 'gs', 's3'])
def test_an_output_is_claimed_by_exactly_one_run(store, tmp_path, gcs_server, s3_server):
  from apache_beam.io.filesystems import FileSystems
  from apache_beam.options.pipeline_options import PipelineOptions
  options = PipelineOptions(s3_server.options)
  FileSystems.set_options(options)
  if store == 'local':
    output = str(tmp_path / 'out')
  elif store == 'gs':
    gcs_server.create_bucket('claims')
    output = 'gs://claims/run1'
  else:
    s3_server.create_bucket('claims')
    output = 's3://claims/run1'
  claim_output(output, {'run': 1}, options)
  leftover = FileSystems.join(  # an interrupted sink's
      output, 'beam-temp-embeddings-006bf72aed6911f1826502fc00000001/part-0')
  with FileSystems.create(leftover) as f:
    f.write(b'partial')
  with pytest.raises(OutputExistsError,
                     match='has not finished.*1 beam-temp-\\* folder holding 1 partial file'):
    claim_output(output, {'run': 2}, options)
  claim_output(output, {'run': 3}, options, clean_unfinished=True)  # asked for: cleaned, claimed
  with FileSystems.open(FileSystems.join(output, CLAIM_FILE)) as f:
    assert json.loads(f.read())['run'] == 3
  assert not FileSystems.exists(leftover)
  if store == 'local':
    assert os.listdir(output) == [CLAIM_FILE]


def test_clean_unfinished_refuses_a_run_still_going_and_cleans_it_once_dead(tmp_path):
  """Alive by the readers' rule (storage.run_dirs.Unfinished.alive): a local-runner run while its
  launcher's process runs, any other while its heartbeat is under an hour old."""
  from apache_beam.options.pipeline_options import PipelineOptions
  options = PipelineOptions([])
  output = tmp_path / 'out'
  output.mkdir()
  shard = output / 'embeddings-00000-of-00001.parquet'
  shard.write_bytes(b'partial')
  now = datetime.datetime.now(datetime.timezone.utc)
  hours_ago = (now - datetime.timedelta(hours=3)).isoformat()
  launcher = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
  local = {'runner': 'FnApiRunner', 'host': socket.gethostname(), 'pid': launcher.pid,
           'started_at': hours_ago}
  dataflow = {'runner': 'DataflowRunner', 'host': 'a-laptop', 'pid': 4321,
              'started_at': hours_ago,
              'heartbeat_at': (now - datetime.timedelta(minutes=5)).isoformat()}
  try:
    for claim, sign in ((local, f'pid {launcher.pid}, runner FnApiRunner'),
                        (dataflow, 'last sign of life 5 min ago')):
      (output / CLAIM_FILE).write_text(json.dumps(claim))
      with pytest.raises(OutputExistsError) as refused:
        claim_output(str(output), {'run': 2}, options, clean_unfinished=True)
      message = str(refused.value)
      assert '\n' not in message and 'still going' in message and str(output) in message
      assert sign in message and 'Wait for it to finish' in message
      assert shard.exists() and json.loads((output / CLAIM_FILE).read_text()) == claim
  finally:
    launcher.kill()
    launcher.wait()
  (output / CLAIM_FILE).write_text(json.dumps(local))  # its launcher has exited: dead
  deleted = claim_output(str(output), {'run': 2}, options, clean_unfinished=True)
  assert str(shard) in deleted and not shard.exists()
  assert json.loads((output / CLAIM_FILE).read_text())['run'] == 2


def test_two_runs_started_at_once_do_not_mix(image_folder, tmp_path):
  output = str(tmp_path / 'out')
  args = [f'--input={image_folder}/*.png', TINY, f'--output={output}']
  first, second = (subprocess.Popen([sys.executable, 'run_pipeline.py'] + args, cwd=PROJECT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for _ in range(2))
  results = [p.communicate(timeout=300) + (p.returncode,) for p in (first, second)]
  codes = sorted(code for _, _, code in results)
  assert codes == [0, 2]
  refused = next(err for _, err, code in results if code == 2)
  assert 'choose a new --output' in refused and 'is still going' in refused
  assert len([n for n in os.listdir(output) if n.startswith('embeddings-')]) == 1


def test_ctrl_c_says_in_one_line_what_was_left(image_folder, tmp_path):
  output = tmp_path / 'out'
  process = subprocess.Popen(
      [sys.executable, 'run_pipeline.py', f'--input={image_folder}',
       '--model=builtin:pnasnet_large', f'--output={output}'], cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  deadline = time.monotonic() + 120
  while not (output / CLAIM_FILE).exists() and time.monotonic() < deadline:
    time.sleep(0.2)
  time.sleep(2)  # inside the pipeline: building the large network
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('error: interrupted: ') and '--clean_unfinished' in last
  assert not (output / 'run_summary.json').exists()
  rerun = _cli([f'--input={image_folder}/camera.png', TINY, f'--output={output}'])
  assert rerun.returncode == 2 and 'has not finished and is dead' in rerun.stderr
  assert 'its launcher is no longer running on this host' in rerun.stderr
  cleaned = _cli([f'--input={image_folder}/camera.png', TINY, f'--output={output}',
                  '--clean_unfinished'])
  assert cleaned.returncode == 0, cleaned.stderr
  assert sorted(os.listdir(output)) == ['embeddings-00000-of-00001.tfrecord',
                                        'index-00000-of-00001.parquet', CLAIM_FILE,
                                        'run_summary.json']


def test_output_dates_expand_once_at_launch(image_folder, tmp_path):
  now = datetime.datetime(2026, 11, 27, 3, 4, 5, tzinfo=datetime.timezone.utc)
  assert expand_output('gs://b/emb/{date}', now) == 'gs://b/emb/2026-11-27'
  assert expand_output('/x/{datetime}', now) == '/x/2026-11-27T030405Z'
  summary = run([f'--input={image_folder}/camera.png', TINY,
                 f'--output={tmp_path}/emb/{{date}}'])
  assert summary['output'] == str(tmp_path / 'emb' / summary['started_at'][:10])
  with pytest.raises(OutputExistsError, match=r'already holds a finished run.*\{datetime\}'):
    run([f'--input={image_folder}/camera.png', TINY, f'--output={summary["output"]}'])


def test_every_provenance_option_is_recorded(image_folder, tmp_path):
  """docs/flags.md's options that change vectors, all at once, in every Example."""
  output = str(tmp_path / 'out')
  summary = run([f'--input={image_folder}/*.jpg', f'--input={image_folder}/camera.png', TINY,
                 f'--output={output}', '--seed=9', '--compute_dtype=float16',
                 '--center_crop_fraction=0.875', '--jpeg_draft', '--compression=gzip',
                 '--num_shards=2', '--output_format=both', '--min_batch_size=2',
                 '--max_batch_size=4', '--max_image_pixels=100000000',
                 '--max_file_bytes=10000000'])
  assert summary['model'] == 'builtin:pnasnet_tiny@untrained-seed9+float16'
  assert summary['recipe'] == 'compute_dtype=float16;center_crop_fraction=0.875;jpeg_draft=1'
  assert summary['weights'] == 'untrained seed 9'
  assert summary['pipeline_version'].startswith('pnasnet-embeddings ')
  examples = read_examples(output, tmp_path)
  assert len(examples) == summary['embedded'] == 3  # rocket, hubble, camera
  for example in examples:
    feature = example.features.feature
    assert feature['model'].bytes_list.value == [summary['model'].encode()]
    assert feature['model/weights'].bytes_list.value == [b'untrained seed 9']
    assert feature['embedding/recipe'].bytes_list.value == [summary['recipe'].encode()]
    assert feature['pipeline/version'].bytes_list.value == [summary['pipeline_version'].encode()]


def test_an_exported_untrained_module_is_labelled(tmp_path, image_folder, capsys):
  from commands.export_model import main as export
  module = str(tmp_path / 'module')
  export(['--config=tiny', '--format=tf1_hub', f'--output={module}', '--seed=4'])
  summary = run([f'--input={image_folder}/camera.png', f'--model={module}',
                 f'--output={tmp_path}/out'])
  assert summary['model'] == f'{module}@untrained-seed4'
  assert summary['weights'].startswith('untrained seed 4 (exported by pnasnet.export)')
  builtin = run([f'--input={image_folder}/camera.png', TINY, '--seed=4',
                 f'--output={tmp_path}/builtin'])
  vectors = [read_examples(out, tmp_path)[0].features.feature['embedding'].float_list.value
             for out in (f'{tmp_path}/out', builtin['output'])]
  np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)


def test_documented_read_back_works_for_any_model_and_gzip(image_folder, tmp_path, monkeypatch):
  """docs/output-format.md's snippet, run as written, on a gzip run of a 160-d model."""
  run([f'--input={image_folder}/*.png', TINY, f'--output={tmp_path}/run',
       '--compression=gzip'])
  text = open(OUTPUT_FORMAT_PAGE).read()
  snippet = re.search(r'## Reading the embeddings back.*?```python\n(.*?)```', text, re.S).group(1)
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(snippet.replace('output/sample_run', 'run'), scope)  # pylint: disable=exec-used
  records = list(scope['ds'])
  assert len(records) == 4 and records[0]['embedding'].shape == (160,)


def test_help_shows_the_project_flags_briefly():
  short = _cli(['--help'], check=True).stdout
  assert len(short.splitlines()) < 200 and '--input_manifest' in short  # with Beam's: 980
  assert '--runner RUNNER' not in short and '--help_beam' in short
  assert '--runner RUNNER' in _cli(['--help_beam'], check=True).stdout


def test_a_clean_run_log_has_no_alarming_lines(image_folder, tmp_path):
  result = _cli([f'--input={image_folder}/*.png', TINY, f'--output={tmp_path}/out'])
  assert result.returncode == 0, result.stderr
  for alarming in ('min_shards undef', 'Resource module is not available',
                   'No shards found to finalize', 'Traceback'):
    assert alarming not in result.stderr


def test_dataflow_dry_run_puts_the_full_hint_on_the_gpu_step_only(gcs_server, image_folder, tmp_path):
  gcs_server.create_bucket('dry-photos')
  gcs_server.create_bucket('dry-work')
  gcs_server.upload('gs://dry-photos/in/a.jpg', (image_folder / 'rocket.jpg').read_bytes())
  job_file = tmp_path / 'job.json'
  accelerator = 'type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver'
  result = _cli(['--runner=DataflowRunner', '--dry_run=True', '--project=test',
                 '--region=us-central1', '--temp_location=gs://dry-work/tmp',
                 '--input=gs://dry-photos/in/*.jpg', '--output=gs://dry-work/emb/run1',
                 '--model=builtin:pnasnet_large', '--large_model',
                 f'--inference_accelerator={accelerator}', '--inference_min_ram=16GB',
                 '--sdk_container_image=us-docker.pkg.dev/p/images/pnasnet:gpu',
                 f'--dataflow_job_file={job_file}'], env=dict(os.environ))
  assert result.returncode == 0, result.stderr
  assert 'nothing submitted, nothing written' in result.stdout and 'Traceback' not in result.stderr
  job = json.loads(job_file.read_text())
  assert job['options']['sdk_container_image'] == 'us-docker.pkg.dev/p/images/pnasnet:gpu'
  hinted = {s['name'] for s in job['steps'] if 'accelerator' in s['resource_hints']}
  for inside in ('DecodeAndEmbed/ReadImages/', 'DecodeAndEmbed/DecodeImages/', 'RunInference'):
    assert any(inside in name for name in hinted), inside  # reading happens on the GPU workers
  assert not any(name.startswith(('MatchFiles', 'Write')) for name in hinted)  # matching not
  assert hinted == {s['name'] for s in job['steps'] if s['name'].startswith('DecodeAndEmbed/')}
  assert all(s['resource_hints']['accelerator'] == accelerator and
             s['resource_hints']['min_ram_bytes'] == '16000000000'
             for s in job['steps'] if s['name'] in hinted)
  assert gcs_server.list('gs://dry-work/emb/') == []  # nothing claimed, nothing written


def test_no_wait_returns_without_reading_a_summary(gcs_server, tmp_path):
  gcs_server.create_bucket('nowait')
  gcs_server.upload('gs://nowait/in/a.png', open(os.path.join(PROJECT, 'sample_images',
                                                             'camera.png'), 'rb').read())
  returned = run(['--runner=DataflowRunner', '--dry_run=True', '--project=test',
                  '--region=us-central1', '--temp_location=gs://nowait/tmp',
                  '--input=gs://nowait/in/*.png', '--output=gs://nowait/emb/{date}', '--no_wait',
                  TINY, '--sdk_container_image=img'])
  assert 'steps' in returned and 'matched' not in returned


def test_a_clean_s3_run_finishes_without_a_failures_file(s3_server, image_folder, tmp_path):
  s3_server.create_bucket('clean')
  for name in ('camera.png', 'rocket.jpg'):
    s3_server.upload(f's3://clean/in/{name}', (image_folder / name).read_bytes())
  summary = run(['--input=s3://clean/in', TINY, '--output=s3://clean/emb/run1']
                + s3_server.options)
  assert (summary['embedded'], summary['failed']) == (2, 0)
  names = [os.path.basename(u) for u in s3_server.list('s3://clean/emb/run1/')]
  assert 'run_summary.json' in names and not any(n.startswith('failures-') for n in names)
  assert not any(os.path.basename(f).startswith('failures-') for f in summary['files'])


def test_an_all_broken_s3_run_finishes_without_an_embeddings_file(s3_server, tmp_path):
  s3_server.create_bucket('broken')
  s3_server.upload('s3://broken/in/a.jpg', b'not an image')
  with pytest.raises(Exception, match='none was embedded'):
    run(['--input=s3://broken/in', TINY, '--output=s3://broken/emb/run1'] + s3_server.options)
  names = [os.path.basename(u) for u in s3_server.list('s3://broken/emb/run1/')]
  assert 'run_summary.json' in names and not any(n.startswith('embeddings-') for n in names)


DRY_DATAFLOW = ['--runner=DataflowRunner', '--dry_run=True', '--project=test',
                '--region=us-central1', '--temp_location=gs://gpu-dry/tmp',
                '--input=gs://gpu-dry/in/*.jpg', '--output=gs://gpu-dry/emb/run1', TINY]
L4 = 'type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver'


@pytest.mark.parametrize('gpu, image', [
    ([f'--inference_accelerator={L4}'], []),
    ([f'--dataflow_service_options=worker_accelerator={L4}'], []),
    ([f'--inference_accelerator={L4}'], ['--sdk_container_image=apache/beam_python3.11_sdk:2.77.0']),
])
def test_a_dataflow_gpu_launch_without_a_cuda_image_is_refused(gpu, image, tmp_path):
  result = _cli(DRY_DATAFLOW + gpu + image + ['--large_model'])
  assert result.returncode == 2, result.stderr
  [line] = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert 'has no CUDA' in line and 'deploy/worker/Dockerfile' in line
  assert '--sdk_container_image' in line and 'Traceback' not in result.stderr


@pytest.mark.parametrize('count, given', [(1, '--large_model'), (2, '--model_copies 2')])
def test_a_gpu_launch_without_model_sharing_gets_one_model_per_gpu(count, given, gcs_server,
                                                                   image_folder):
  gcs_server.create_bucket('gpu-dry')
  gcs_server.upload('gs://gpu-dry/in/a.jpg', (image_folder / 'rocket.jpg').read_bytes())
  hint = L4.replace('count:1', f'count:{count}')
  result = _cli(DRY_DATAFLOW + [f'--inference_accelerator={hint}',
                                '--sdk_container_image=us-docker.pkg.dev/p/i/worker:1'],
                env=dict(os.environ))
  assert result.returncode == 0, result.stderr
  assert f'{given}: one model per GPU' in result.stderr


@pytest.mark.parametrize('args, words', [
    (['--output_format', 'csv'], "invalid choice: 'csv'"),
    # the dry-run snippet of docs/dataflow.md with an empty $WORKER_IMAGE
    (['--sdk_container_image', f'--inference_accelerator={L4}'], 'expected one argument'),
])
def test_a_bad_value_is_said_in_one_line(args, words, image_folder, tmp_path):
  result = _cli([f'--input={image_folder}/*.png', TINY, f'--output={tmp_path}/out'] + args)
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert words in result.stderr and result.stderr.startswith('error: ')
  assert not (tmp_path / 'out').exists()


IMPORTS_TENSORFLOW = '''
import runpy, sys
sys.argv = ['run_pipeline.py'] + sys.argv[1:]
try:
  runpy.run_path('run_pipeline.py', run_name='__main__')
except SystemExit:
  pass
finally:
  print('tensorflow imported' if 'tensorflow' in sys.modules else 'no tensorflow',
        file=sys.stderr)
'''


@pytest.mark.parametrize('args', [['--help'], ['--input=x', '--output_format=csv'],
                                  ['--input=x', '--seed=-1', '--output=/tmp/x']])
def test_help_and_option_errors_import_no_tensorflow(args):
  result = subprocess.run([sys.executable, '-c', IMPORTS_TENSORFLOW] + args, cwd=PROJECT,
                          capture_output=True, text=True, timeout=300)
  assert result.stderr.strip().endswith('no tensorflow'), result.stderr[-2000:]


FULL_DISK = '''
set -e
mount -t tmpfs -o size=256k tmpfs "$1"
head -c 248k /dev/zero > "$1/other-files"
shift
exec "$@"
'''


def test_a_full_disk_ends_in_one_line_naming_the_unfinished_output(image_folder, tmp_path):
  """A real full filesystem: a 256 KB tmpfs in a user and mount namespace of its own (no root
  needed), all but two pages taken by another file: the claim fits, the shards do not."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  result = subprocess.run(
      ['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c', FULL_DISK, 'sh', str(disk),
       sys.executable, 'run_pipeline.py', f'--input={image_folder}', TINY,
       f'--output={disk}/run1', '--output_format=both'],
      cwd=PROJECT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: no room left to write (No space left on device): '), last
  assert f'{disk}/run1 holds an unfinished run' in last and 'free some space, then rerun' in last
  assert 'Traceback' not in result.stderr and 'Exception ignored' not in result.stderr
