"""The launcher at the edges (issue 18, launcher and run-outcome side): what --clean_unfinished
deletes, dry runs that write nothing, the documented backfill loop run twice, exit
codes that tell bad images from a failed run, --max_failed_fraction,
Ctrl-C, the Dataflow dry run's output and missing credentials, the GPU self-check's arguments,
bounds on options, and the run-listing command."""

import glob
import gzip
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

import collection
from pipeline.launcher import run
from pipeline.options import OptionsError
from pnasnet import build_model
from pnasnet.checkpoint import model_values, save_slim_checkpoint
from tests.test_pipeline import PROJECT

TINY = '--model=builtin:pnasnet_tiny'
CLAIM = 'run_claim.json'
SUMMARY = 'run_summary.json'


def _cli(args, cwd=PROJECT, timeout=600, **kwargs):
  return subprocess.run([sys.executable, os.path.join(PROJECT, 'run_pipeline.py')] + args,
                        cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _docs() -> str:
  """The user's manual: README.md and the docs/ pages it links to."""
  paths = [os.path.join(PROJECT, 'README.md')] + sorted(glob.glob(os.path.join(PROJECT, 'docs',
                                                                               '*.md')))
  return '\n'.join(open(path, encoding='utf-8').read() for path in paths)


def _dead_claim(output, **fields) -> None:
  """What a launcher killed mid-run leaves: its claim (a pid that no longer runs), no summary."""
  os.makedirs(output, exist_ok=True)
  claim = dict({'started_at': '2026-11-27T02:00:00.000+00:00', 'host': 'elsewhere',
                'pid': 999999, 'output_format': 'tfrecord'}, **fields)
  with open(os.path.join(output, CLAIM), 'w') as f:
    json.dump(claim, f)


def _summary(output) -> dict:
  with open(os.path.join(output, SUMMARY)) as f:
    return json.load(f)


# 1
def test_clean_unfinished_deletes_only_what_the_unfinished_run_wrote(image_folder, tmp_path):
  output = tmp_path / 'photos'
  _dead_claim(str(output))
  stale_shard = output / 'embeddings-00001-of-00003.tfrecord'
  stale_shard.write_bytes(b'partial')
  temp = output / 'beam-temp-embeddings-0a1b2c3d4e5f60718293a4b5c6d7e8f9'
  temp.mkdir()
  (temp / '4c6a0d8e-part').write_bytes(b'partial')
  users = {'index-01.jpg': b'a photo', 'embeddings-beach.png': b'another',
           'failures-of-2025.txt': b'notes'}
  for name, data in users.items():
    (output / name).write_bytes(data)
  result = _cli([f'--input={image_folder}/camera.png', TINY, f'--output={output}',
                 '--clean_unfinished'])
  assert result.returncode == 0, result.stderr
  for name, data in users.items():
    assert (output / name).read_bytes() == data, f'{name} was not written by a run'
  assert not stale_shard.exists() and not temp.exists()
  assert stale_shard.name in result.stderr and temp.name in result.stderr  # says what it deleted
  assert _summary(output)['embedded'] == 1


# 2
def test_a_local_dry_run_writes_nothing(image_folder, tmp_path):
  output = tmp_path / 'out'
  args = [f'--input={image_folder}/*.png', TINY, f'--output={output}', '--dry_run=True']
  for _ in range(2):
    result = _cli(args)
    assert result.returncode == 0, result.stderr
    assert 'dry run' in result.stdout
    assert not output.exists()


def _upload_tiny_checkpoint(gcs_server, tmp_path, prefix: str) -> None:
  local = str(tmp_path / 'ckpt' / 'model.ckpt')
  save_slim_checkpoint(local, model_values(build_model('tiny', seed=5)))
  for path in glob.glob(local + '*'):
    gcs_server.upload(prefix + path[len(local):], open(path, 'rb').read())


def _shell_block(text: str, start: str) -> str:
  blocks = re.findall(r'```bash\n(.*?)```', text, re.S)
  return next(block for block in blocks if block.lstrip().startswith(start))


# 9
def test_the_documented_backfill_loop_can_be_run_again_as_printed(gcs_server, image_folder,
                                                                   tmp_path):
  """The loop exactly as printed, with the bucket on the local GCS server and the tiny network
  (with a checkpoint at the printed path) for the large one; chunk-ab died in an earlier pass."""
  loop = _shell_block(_docs(), 'for chunk in')
  gcs_server.create_bucket('my-bucket')
  names = ['camera.png', 'rocket.jpg', 'chelsea.png', 'notes.jpg', 'coffee.png']
  for name in names:
    gcs_server.upload(f'gs://my-bucket/photos/{name}', (image_folder / name).read_bytes())
  chunks = re.search(r'for chunk in ([^;]+);', loop).group(1).split()
  for number, chunk in enumerate(chunks):
    listed = names[number::len(chunks)]
    gcs_server.upload(f'gs://my-bucket/lists/{chunk}',
                      ''.join(f'gs://my-bucket/photos/{n}\n' for n in listed).encode())
  checkpoint = re.search(r'--checkpoint (\S+)', loop).group(1)
  _upload_tiny_checkpoint(gcs_server, tmp_path, checkpoint)
  died = f'gs://my-bucket/embeddings/backfill-{chunks[1]}'
  gcs_server.upload(f'{died}/{CLAIM}', json.dumps({'pid': 999999, 'host': 'elsewhere'}).encode())
  gcs_server.upload(f'{died}/beam-temp-embeddings-5f0c3e1aed6911f1826502fc00000001/part-0', b'partial')
  assert 'pnasnet-embeddings embed ' in loop, loop
  # The collection on local disk: Lance cannot reach the local GCS server (docs/running.md).
  collection_uri = re.search(r'--collection (\S+)', loop).group(1)
  script = loop.replace('builtin:pnasnet_large', 'builtin:pnasnet_tiny').replace(
      'pnasnet-embeddings embed ', f'{shlex.quote(sys.executable)} -m commands embed ').replace(
      collection_uri, str(tmp_path / 'collection'))
  finished = {}
  for attempt in range(2):
    result = subprocess.run(['bash', '-c', script], cwd=PROJECT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not re.search('^error:', result.stderr, re.M), result.stderr[-3000:]
    summaries = {chunk: json.loads(gcs_server.download(
        f'gs://my-bucket/embeddings/backfill-{chunk}/{SUMMARY}')) for chunk in chunks}
    if attempt == 0:
      finished = summaries
      assert sum(s['embedded'] + s['failed'] for s in summaries.values()) == len(names)
    else:  # the second pass finds every chunk finished and leaves it alone
      assert summaries == finished
  history = collection.history(str(tmp_path / 'collection'))
  assert [entry.run for entry in history if entry.kind == 'night'] == [
      f'gs://my-bucket/embeddings/backfill-{chunk}' for chunk in chunks]  # one commit a chunk
  assert history[-1].rows == sum(s['embedded'] for s in finished.values())
  assert gcs_server.list(f'{died}/beam-temp-embeddings-5f0c3e1aed6911f1826502fc00000001/') == []


# 13
def test_a_night_whose_only_new_file_is_broken_still_succeeds(image_folder, tmp_path):
  nights = tmp_path / 'nights'
  first = _cli([f'--input={image_folder}/*.png', TINY, f'--output={nights}/1',
                f'--collection={nights}/collection'])
  assert first.returncode == 0, first.stderr
  inputs = [f'--input={image_folder}/*.png', f'--input={image_folder}/notes.jpg']
  second = _cli(inputs + [TINY, f'--output={nights}/2', f'--collection={nights}/collection'])
  assert second.returncode == 0, second.stderr
  summary = _summary(nights / '2')
  assert (summary['embedded'], summary['failed'], summary['skipped']) == (0, 1, 4)
  assert summary['outcome'] == 'finished'
  assert 'notes.jpg' in second.stderr  # the bad image is named, though the run worked


# issue 16: --max_failed_fraction
def test_a_run_over_mostly_broken_files_fails_after_writing_a_summary_that_says_so(
    image_folder, tmp_path):
  output = tmp_path / 'out'
  inputs = [f'--input={image_folder}/{name}' for name in
            ('camera.png', 'notes.jpg', 'empty.jpg', 'truncated.jpg')]
  result = _cli(inputs + [TINY, f'--output={output}', '--max_failed_fraction=0.5'])
  assert result.returncode == 3, result.stderr
  summary = _summary(output)
  assert (summary['matched'], summary['failed']) == (4, 3)
  assert summary['outcome'] == 'too_many_failures' and summary['max_failed_fraction'] == 0.5
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and '3 of 4' in last and 'max_failed_fraction' in last
  within = _cli(inputs + [TINY, f'--output={tmp_path}/within', '--max_failed_fraction=0.75'])
  assert within.returncode == 0, within.stderr
  assert _summary(tmp_path / 'within')['outcome'] == 'finished'


def _temp_counts(output) -> tuple:
  folders = glob.glob(os.path.join(output, 'beam-temp-*'))
  files = [f for d in folders for _, _, names in os.walk(d) for f in names]
  return len(folders), len(files)


# 14
def test_ctrl_c_even_when_inherited_as_ignored_ends_in_one_true_line(image_folder, tmp_path):
  output = tmp_path / 'out'
  process = subprocess.Popen(  # as a script's `cmd &` starts it: SIGINT ignored
      [sys.executable, 'run_pipeline.py', f'--input={image_folder}',
       '--model=builtin:pnasnet_large', f'--output={output}'], cwd=PROJECT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
  deadline = time.monotonic() + 120
  while not glob.glob(str(output / 'beam-temp-*')) and time.monotonic() < deadline:
    time.sleep(0.2)
  time.sleep(2)  # inside the pipeline: building the large network
  process.send_signal(signal.SIGINT)
  try:
    _, stderr = process.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    process.kill()
    process.communicate()
    pytest.fail('SIGINT was ignored')
  assert process.returncode == 130
  assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('error: interrupted: ')
  folders, files = _temp_counts(output)
  assert folders > 0
  assert re.search(rf'\b{folders} beam-temp-\* folders? holding {files} partial files?\b', last)


# 16
def test_dataflow_dry_run_prints_a_summary_and_writes_the_description_to_the_job_file(
    gcs_server, image_folder, tmp_path):
  gcs_server.create_bucket('dry16')
  gcs_server.upload('gs://dry16/in/a.jpg', (image_folder / 'rocket.jpg').read_bytes())
  job_file = tmp_path / 'job.json'
  common = ['--runner=DataflowRunner', '--dry_run=True', '--project=test', '--region=us-central1',
            '--temp_location=gs://dry16/tmp', '--input=gs://dry16/in/*.jpg',
            '--model=builtin:pnasnet_large', '--sdk_container_image=img',
            '--inference_accelerator=type:nvidia-l4;count:1;install-nvidia-driver']
  result = _cli(common + ['--output=gs://dry16/emb/run1', f'--dataflow_job_file={job_file}'])
  assert result.returncode == 0, result.stderr
  assert len(result.stdout.splitlines()) < 40 and '"steps"' not in result.stdout
  assert str(job_file) in result.stdout
  assert len(json.loads(job_file.read_text())['steps']) > 20
  plain = _cli(common + ['--output=gs://dry16/emb/run2'])
  assert plain.returncode == 0 and len(plain.stdout.splitlines()) < 40
  assert '--dataflow_job_file' in plain.stdout  # where the whole description can go


def _laptop_without_google_credentials(home) -> dict:
  """An environment with an empty HOME and no Google credentials anywhere; nothing leaves this
  machine, whatever the code tries."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(('GOOGLE_', 'STORAGE_EMULATOR',
                                                                  'CLOUDSDK_'))}
  closed = 'http://127.0.0.1:9'
  env.update(HOME=str(home), CLOUDSDK_CONFIG=str(home / 'gcloud'),
             GCE_METADATA_HOST='127.0.0.1:9', GCE_METADATA_IP='127.0.0.1:9',
             HTTPS_PROXY=closed, HTTP_PROXY=closed, https_proxy=closed, http_proxy=closed)
  return env


DATAFLOW_DRY_RUN = ['--runner=DataflowRunner', '--dry_run=True', '--project=p',
                    '--region=us-central1', TINY, '--sdk_container_image=img']


# 16
def test_real_gcs_without_credentials_fails_at_once_saying_how_to_provide_them(tmp_path):
  result = _cli(DATAFLOW_DRY_RUN + ['--temp_location=gs://my-bucket/tmp',
                                    '--input=gs://my-bucket/photos/*.jpg',
                                    '--output=gs://my-bucket/emb/run1'],
                env=_laptop_without_google_credentials(tmp_path), cwd=str(tmp_path), timeout=100)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'credentials' in result.stderr
  assert 'gcloud auth application-default login' in result.stderr
  assert 'GOOGLE_APPLICATION_CREDENTIALS' in result.stderr


@pytest.mark.parametrize('store, words', [
    ('local', ["cannot read this machine's disk: --temp_location dftmp, --input photos/*.jpg, "
               '--output out1 must be in a bucket']),
    ('s3', ['--runner DataflowRunner: no Google Cloud credentials found',
            'gcloud auth application-default login']),
])
def test_a_dataflow_dry_run_from_a_laptop_is_refused_in_one_line_before_any_retry(
    store, words, image_folder, s3_server, tmp_path):
  """Local paths (Dataflow's workers cannot read them), or no Google credentials even without a
  gs:// path (Dataflow's runner needs them): exit 2 at once, not Beam's retries for minutes."""
  env = _laptop_without_google_credentials(tmp_path)
  if store == 'local':
    (tmp_path / 'photos').mkdir()
    (tmp_path / 'photos' / 'rocket.jpg').write_bytes((image_folder / 'rocket.jpg').read_bytes())
    paths = ['--temp_location', 'dftmp', '--input', 'photos/*.jpg', '--output', 'out1']
  else:  # the S3 server answers (the proxies pass it by), so only Google's side is missing
    s3_server.create_bucket('laptop')
    s3_server.upload('s3://laptop/photos/a.jpg', (image_folder / 'rocket.jpg').read_bytes())
    env.update(NO_PROXY='127.0.0.1', no_proxy='127.0.0.1')
    paths = ['--input', 's3://laptop/photos/*.jpg', '--output', 's3://laptop/emb/run1'
             ] + s3_server.options
  result = _cli(DATAFLOW_DRY_RUN + paths, env=env, cwd=str(tmp_path), timeout=100)
  assert result.returncode == 2, result.stderr[-2000:]
  [line] = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert all(word in line for word in words), line
  assert 'Retry' not in result.stderr and 'Traceback' not in result.stderr
  assert sorted(os.listdir(tmp_path)) == ['images'] + ['photos'] * (store == 'local')


# 17
def test_gpu_self_check_checks_the_model_first_and_documents_its_flags():
  wrong = subprocess.run([sys.executable, '-m', 'commands', 'check-gpu', '--model', 'builtin:nope'],
                         cwd=PROJECT, capture_output=True, text=True, timeout=300)
  assert wrong.returncode == 2, wrong.stderr
  assert 'builtin:nope' in wrong.stderr and 'no GPU' not in wrong.stderr
  usage = subprocess.run([sys.executable, '-m', 'commands', 'check-gpu', '--help'], cwd=PROJECT,
                         capture_output=True, text=True, timeout=300, check=True).stdout
  flat = ' '.join(usage.split('options:', 1)[1].split())  # the options, not the usage line
  for flag, default in (('--seed', '0'), ('--compute_dtype', 'float32'), ('--batch_size', '4'),
                        ('--model', 'builtin')):
    described = re.search(rf'{flag} \S+ (.*?)(?= --|$)', flat).group(1)
    assert 'default' in described and default in described, (flag, described)
    assert len(described.split()) > 4, (flag, described)  # help that says something


# 18
@pytest.mark.parametrize('args, message', [
    (['--large_model', '--model_copies=2'], '--large_model'),
    (['--center_crop_fraction=1e-9'], '--center_crop_fraction'),
])
def test_options_that_cannot_make_sense_are_refused(args, message, image_folder, tmp_path):
  with pytest.raises(OptionsError, match=message):
    run([f'--input={image_folder}/camera.png', TINY, f'--output={tmp_path}/out'] + args)
  assert not (tmp_path / 'out').exists()


# 18
def test_a_missing_gcs_object_is_named_in_its_failure(gcs_server, image_folder, tmp_path):
  gcs_server.create_bucket('missing18')
  gcs_server.upload('gs://missing18/in/a.png', (image_folder / 'camera.png').read_bytes())
  gcs_server.upload('gs://missing18/list.txt',
                    b'gs://missing18/in/a.png\ngs://missing18/in/gone.jpg\n')
  summary = run(['--input_manifest=gs://missing18/list.txt', TINY,
                 '--output=gs://missing18/emb/run1'])
  assert summary['failed'] == 1
  failure = summary['example_failures'][0]
  assert failure['uri'] == 'gs://missing18/in/gone.jpg'
  assert '%s' not in failure['message'] and 'gs://missing18/in/gone.jpg' in failure['message']


# 20
def test_a_bad_whole_number_is_reported_in_words(image_folder, tmp_path):
  result = _cli([f'--input={image_folder}/camera.png', TINY, f'--output={tmp_path}/out',
                 '--max_batch_size=many'])
  assert result.returncode == 2
  assert '_positive_int' not in result.stderr
  assert '--max_batch_size' in result.stderr and 'many' in result.stderr


def _command_writing(text: str, output: str) -> str:
  """The documented `pnasnet-embeddings embed` command (continuation lines joined) that writes
  `output`."""
  for block in re.findall(r'```bash\n(.*?)```', text, re.S):
    for command in block.replace('\\\n', ' ').splitlines():
      if (command.startswith('pnasnet-embeddings embed ') and
          f'--output {output} ' in command + ' '):
        return command
  raise AssertionError(f'no documented command writes {output}')


# 20
def test_the_documented_duckdb_examples_read_a_run_the_docs_create(tmp_path):
  text = _docs()
  queries = [line for line in text.splitlines()
             if line.startswith('python -c "import duckdb') and 'embeddings-*.parquet' in line]
  assert queries
  runs = {re.match(r"'([^']+)/embeddings-\*\.parquet'", m).group(1)
          for q in queries for m in re.findall(r"'[^']+/embeddings-\*\.parquet'", q)}
  os.symlink(os.path.join(PROJECT, 'sample_images'), tmp_path / 'sample_images')
  for output in runs:
    command = _command_writing(text, output)
    args = shlex.split(command)[2:]  # after `pnasnet-embeddings embed`
    assert any(a in ('parquet', 'both') for a in args), command
    created = subprocess.run(
        [sys.executable, '-m', 'commands', 'embed'] +
        [a.replace('builtin:pnasnet_large', 'builtin:pnasnet_tiny') for a in args],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [PROJECT, os.environ.get('PYTHONPATH')]))))
    assert created.returncode == 0, created.stderr[-2000:]
  for query in queries:
    result = subprocess.run(['bash', '-c', query.replace('python -c', f'{sys.executable} -c', 1)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
    if 'chelsea.png' in query:  # the photo itself comes first
      assert re.findall(r'\w+\.(?:png|jpg)', result.stdout)[0] == 'chelsea.png', result.stdout


def test_the_documented_inventory_reports_become_manifests_the_pipeline_reads(tmp_path):
  """docs/running.md's two DuckDB lines, run as printed on an S3 Inventory part (no header,
  URL-encoded keys, gzip) and a GCS Storage Insights report (a header); the manifests they write
  name the images, one URI a line: the format --input_manifest reads."""
  lines = [line for line in _docs().splitlines()
           if line.startswith('python -c "import duckdb') and 'manifest-' in line]
  assert len(lines) == 2
  (tmp_path / 'inventory').mkdir()
  with gzip.open(tmp_path / 'inventory' / 'part-0.csv.gz', 'wt') as f:
    f.write('"photos","cam/IMG%20001.JPG","1234"\n"photos","cam/notes.txt","10"\n'
            '"photos","cam/b%2Bc.png","99"\n')
  (tmp_path / 'report').mkdir()
  (tmp_path / 'report' / 'r.csv').write_text('bucket,name,size\nshots,a/x.jpg,5\nshots,b/y.png,6\n')
  for line in lines:
    result = subprocess.run(['bash', '-c', line.replace('python -c', f'{sys.executable} -c', 1)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
  s3 = (tmp_path / 'manifest-s3.txt').read_text().splitlines()
  gs = (tmp_path / 'manifest-gs.txt').read_text().splitlines()
  assert sorted(s3) == ['s3://photos/cam/IMG 001.JPG', 's3://photos/cam/b+c.png']
  assert sorted(gs) == ['gs://shots/a/x.jpg', 'gs://shots/b/y.png']


def test_runs_of_two_models_are_refused_naming_the_flag_that_chooses(tmp_path):
  from storage.run_dirs import MixedModelsError, find_runs, select_model
  from tests.run_writer import rows, write_run
  for seed in (0, 1):
    write_run(str(tmp_path / f'seed{seed}'), rows(['a'], 4, seed=seed),
              model=f'builtin:m@untrained-seed{seed}')
  with pytest.raises(MixedModelsError) as refused:
    select_model(find_runs(f'{tmp_path}/*'))
  assert str(refused.value).endswith('Choose one with --model MODEL_ID')
  assert 'model=' not in str(refused.value)


# Also expected: a command that lists run directories and their state
def test_list_runs_shows_each_run_directory_and_its_state(image_folder, tmp_path):
  runs = tmp_path / 'runs'
  run([f'--input={image_folder}/camera.png', f'--input={image_folder}/notes.jpg', TINY,
       f'--output={runs}/finished'])
  _dead_claim(str(runs / 'died'), host='batch-7', pid=4242)
  (runs / 'not-a-run').mkdir()
  result = subprocess.run([sys.executable, '-m', 'commands', 'runs', f'{runs}/*'],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
  lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
  finished, died = lines[str(runs / 'finished')], lines[str(runs / 'died')]
  assert 'finished' in finished and 'builtin:pnasnet_tiny@untrained-seed0' in finished
  assert re.search(r'\b2\b.*\b1\b.*\b1\b', finished)  # matched, embedded, failed
  assert 'unfinished' in died and 'batch-7' in died and '4242' in died
  assert str(runs / 'not-a-run') not in lines
  assert result.returncode == 1  # one run is unfinished
  only_finished = subprocess.run([sys.executable, '-m', 'commands', 'runs',
                                  f'{runs}/finished', '--json'], cwd=PROJECT,
                                 capture_output=True, text=True, timeout=300)
  assert only_finished.returncode == 0
  listed = json.loads(only_finished.stdout)
  assert [(r['run'], r['state'], r['matched']) for r in listed] == [
      (str(runs / 'finished'), 'finished', 2)]
