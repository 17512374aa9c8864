"""The manual against the code: docs/flags.md, `pnasnet-embeddings embed --help` and the Flex
Template's deploy/flex/metadata.json name the same flags with the same defaults and choices; the
commands the pages show use verbs and flags that exist; links between the pages lead somewhere."""

import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from commands.cli import VERBS
from commands.common import PROGRAM
from commands.embed import JSON_FLAG
from pipeline import flags_doc
import pipeline.options  # noqa: F401  (registers the embedding job's flags beside Beam's)
from pipeline.beam_flags import all_flags_parser

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(PROJECT, 'docs')
FLAGS_PAGE = os.path.join(DOCS, 'flags.md')
# Defaults that metadata.json states in words, with the words and the value they stand for.
WORDED_DEFAULTS = {
    'model': ('the TF-Hub PNASNet-5 Large feature-vector module',
              'https://tfhub.dev/google/imagenet/pnasnet_large/feature_vector/1'),
}


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def _manual_pages() -> dict:
  pages = {'README.md': _read(os.path.join(PROJECT, 'README.md'))}
  for name in sorted(os.listdir(DOCS)):
    if name.endswith('.md'):
      pages[f'docs/{name}'] = _read(os.path.join(DOCS, name))
  return pages


def _page_table(text: str, heading: str) -> dict:
  """The rows of the table under `heading`, by flag name, as lists of cells."""
  section = text.split(f'\n## {heading}\n', 1)[1].split('\n## ', 1)[0]
  rows = {}
  for line in section.splitlines():
    match = re.match(r'\| `--([a-z0-9_]+)` \|(.*)\|$', line)
    if match:
      cells = [c.strip() for c in re.split(r'(?<!\\)\|', match.group(2))]
      rows[match.group(1)] = cells
  return rows


def _page_flags() -> dict:
  """docs/flags.md's project flags: {name: (default text or None, choices or None)}."""
  flags = {}
  for name, cells in _page_table(_read(FLAGS_PAGE), "This project's flags").items():
    default, value = cells[0], cells[1]
    choices = re.findall(r'`([^`]+)`', value) if value.startswith('one of ') else None
    flags[name] = (None if default == 'none' else default.strip('`'), choices)  # `none` is a value
  return flags


def _help_flags() -> dict:
  """`pnasnet-embeddings embed --help` as a user sees it: {name: choices or None} of the job's
  flags (not --json, which only chooses what the command prints), and their stated defaults."""
  wide = dict(os.environ, COLUMNS='10000')  # argparse would wrap long defaults mid-word
  text = subprocess.run([sys.executable, '-m', 'commands', 'embed', '--help'], cwd=PROJECT,
                        check=True, capture_output=True, text=True, env=wide).stdout
  flags, stated = {}, {}
  for entry in re.split(r'\n(?=  --)', text)[1:]:  # one entry per flag: its line and its help
    name, choices = re.match(r'  --([a-z0-9_]+)(?: \{([^}]*)\})?', entry).groups()
    if f'--{name}' == JSON_FLAG:
      continue
    flags[name] = choices.split(',') if choices else None
    entry = entry.split('\n\n')[0]  # not the next group's title
    default = re.search(r'\(default: (\S+)\)|Default: (\S+)', ' '.join(entry.split()))
    if default:
      stated[name] = default.group(1) or default.group(2)
  return flags, stated


def test_the_flags_page_is_what_flags_doc_generates():
  assert _read(FLAGS_PAGE) == flags_doc.render(), (
      'docs/flags.md is stale: python -m pipeline.flags_doc > docs/flags.md')


def test_help_and_the_flags_page_name_the_same_flags_and_choices():
  page = _page_flags()
  help_flags, stated_defaults = _help_flags()
  assert sorted(help_flags) == sorted(page), 'flags in --help and docs/flags.md differ'
  for name, choices in help_flags.items():
    assert (sorted(choices) if choices else None) == (
        sorted(page[name][1]) if page[name][1] else None), name
  assert stated_defaults, '--help states no default at all: the parsing above broke'
  for name, default in stated_defaults.items():
    assert page[name][0] == default, f'--{name}: --help says {default}, the page {page[name][0]}'


def test_the_flags_page_defaults_are_what_an_empty_command_line_gets():
  options = PipelineOptions([]).get_all_options()
  for name, (default, _) in _page_flags().items():
    value = options[name]
    expected = 'off' if value is False else None if value is None else str(value)
    assert default == expected, f'--{name}: docs/flags.md says {default}, the parser {expected}'


def _stated_default(help_text: str):
  match = re.search(r'Default: (.*?)\.?(?:\s|$)', help_text)
  return match and match.group(1)


def _regex_choices(parameter: dict):
  for regex in parameter.get('regexes', []):
    match = re.fullmatch(r'\^\(([a-z0-9_|]+)\)\$', regex)
    if match:
      return sorted(match.group(1).split('|'))
  return None


def test_the_template_parameters_agree_with_the_flags_page():
  page = _page_flags()
  beam_on_page = _page_table(_read(FLAGS_PAGE), "Beam's options used in this manual")
  metadata = json.loads(_read(os.path.join(PROJECT, 'deploy', 'flex', 'metadata.json')))
  for parameter in metadata['parameters']:
    name = parameter['name']
    assert name in page or name in beam_on_page, f'template parameter {name} is not on the page'
    if name not in page:
      continue
    default, choices = page[name]
    stated = _stated_default(parameter['helpText'])
    if name in WORDED_DEFAULTS:
      words, value = WORDED_DEFAULTS[name]
      assert words in parameter['helpText'] and default == value, name
    elif default is None:
      assert stated is None, f'{name}: metadata.json states a default ({stated}), the flag has none'
    else:
      assert stated == {'off': 'false'}.get(default, default), (
          f'{name}: metadata.json says the default is {stated}, docs/flags.md {default}')
    if default == 'off':
      assert _regex_choices(parameter) == ['false', 'true'], name
    elif choices:
      assert _regex_choices(parameter) == sorted(choices), (
          f'{name}: metadata.json accepts {_regex_choices(parameter)}, the flag {choices}')


def test_every_flag_has_an_example_the_parser_accepts():
  parser = flags_doc.project_parser()
  for name, notes in flags_doc.NOTES.items():
    args = shlex.split(notes.example)
    assert args[0] == f'--{name}', name
    assert parser.parse_args(args) is not None


def _commands(text: str):
  """Each `pnasnet-embeddings VERB ...` command in the page's shell blocks, continuation lines
  joined, as (verb, the command), also as a container's entry point (`docker run ...
  --entrypoint pnasnet-embeddings IMAGE VERB ...`, the command from the program on)."""
  for block in re.findall(r'```bash\n(.*?)```', text, re.S):
    for line in block.replace('\\\n', ' ').splitlines():
      in_container = re.search(rf'--entrypoint {PROGRAM} \S+ (.*)', line)
      if in_container:
        line = f'{PROGRAM} {in_container.group(1)}'
      words = line.split()
      if words and words[0] == PROGRAM:
        yield (words[1] if len(words) > 1 else ''), line


def _option_strings(parser) -> set:
  return {s for a in parser._actions for s in a.option_strings if s.startswith('--')}  # pylint: disable=protected-access


# Verbs that take their own flags only; the others hand Beam the flags Beam knows.
OWN_FLAGS_ONLY = ('check-gpu', 'export-model')


def _beam_flags() -> set:
  """Beam's own options, which the verbs that run Beam or read runs pass through (not the
  embedding job's)."""
  return _option_strings(all_flags_parser(beam_only=True))


def _verb_flags(verb: str, line: str) -> set:
  """The flags `pnasnet-embeddings VERB` accepts: for `embed` the job's and Beam's
  (`all_flags_parser`), --json and --help_beam; for the others the verb's own (for `index` and
  `collection`, those of the sub-verb) and, but for OWN_FLAGS_ONLY, Beam's, which pass through."""
  if verb == 'embed':
    return _option_strings(all_flags_parser()) | {JSON_FLAG, '--help_beam', '--help'}
  parser = importlib.import_module(VERBS[verb][0]).build_parser()
  if verb in ('index', 'collection'):
    sub = line.split()[2]
    parser = parser._subparsers._group_actions[0].choices[sub]  # pylint: disable=protected-access
  return _option_strings(parser) | (set() if verb in OWN_FLAGS_ONLY else _beam_flags())


def test_the_manuals_commands_use_verbs_and_flags_that_exist():
  seen = {}
  for page, text in _manual_pages().items():
    for verb, line in _commands(text):
      assert verb in VERBS, f'{page}: {line[:60]}... names no verb of {PROGRAM}'
      seen[verb] = seen.get(verb, 0) + 1
      known = _verb_flags(verb, line)
      for flag in re.findall(r'(?:^|[\s\[])(--[a-z0-9_]+)', line):
        assert flag in known, f'{page}: {line[:60]}... uses unknown flag {flag} of {verb}'
  # the block parsing broke if the pages seem to show fewer commands than they do
  least = {'embed': 8, 'runs': 2, 'neighbours': 4, 'duplicates': 1, 'index': 2, 'collection': 4,
           'export': 1, 'browse': 1, 'check-gpu': 1, 'export-model': 2}
  for verb, count in least.items():
    assert seen.get(verb, 0) >= count, f'found {seen.get(verb, 0)} `{PROGRAM} {verb}` commands'


@pytest.mark.parametrize('page', sorted(_manual_pages()))
def test_links_between_the_pages_lead_somewhere(page):
  text = _manual_pages()[page]
  base = os.path.dirname(os.path.join(PROJECT, page))
  for target, anchor in re.findall(r'\]\(([^)#:]*)(?:#([^)]*))?\)', text):
    path = os.path.join(base, target) if target else os.path.join(PROJECT, page)
    assert os.path.exists(path), f'{page} links to missing {target}'
    if anchor:
      headings = re.findall(r'^#+ (.*)$', _read(path), re.M)
      slugs = {re.sub(r'[^\w\- ]', '', h.lower()).replace(' ', '-') for h in headings}
      assert anchor in slugs, f'{page} links to {target}#{anchor}, a heading that does not exist'


def _section(page: str, heading: str) -> str:
  """The text under `## heading` of docs/PAGE, up to the next `## ` heading."""
  return _read(os.path.join(DOCS, page)).split(f'\n## {heading}\n', 1)[1].split('\n## ', 1)[0]


def test_the_models_page_says_where_the_checkpoint_is_and_that_the_default_needs_the_network():
  section = _section('models.md', 'Where the weights come from')
  default = PipelineOptions([]).get_all_options()['model']
  assert f'`{default}`' in section and 'network access' in section
  assert ('https://storage.googleapis.com/download.tensorflow.org/models/'
          'pnasnet-5_large_2017_12_13.tar.gz') in section
  checkpoint = '--model builtin:pnasnet_large --checkpoint pnasnet-5_large_2017_12_13/model.ckpt'
  assert [line for verb, line in _commands(section) if verb == 'embed' and checkpoint in line]


def test_the_dataflow_page_names_the_gpu_quotas_and_zones_for_its_first_launch():
  section = _section('dataflow.md', 'GPU quota and zones, before the first job')
  for said in ('NVIDIA_L4_GPUS', 'NVIDIA_T4_GPUS', 'GPUS_ALL_REGIONS',
               'gcloud compute accelerator-types list'):
    assert said in section, said
  assert '--max-workers 8' in section and '--max-workers 8' in _section('dataflow.md',
                                                                       'First launch')
  beam_flags = _beam_flags()
  for flag in ('--max_num_workers', '--worker_zone'):
    assert f'`{flag}' in section and flag in beam_flags, flag


def test_the_dataflow_page_gives_cloud_builds_account_the_model_and_the_repository():
  section = _section('dataflow.md', "Cloud Build's service account")
  assert 'gcloud builds get-default-service-account' in section
  assert '--role=roles/storage.objectViewer' in section
  assert '--role=roles/artifactregistry.writer' in section
  build = _read(os.path.join(PROJECT, 'deploy', 'cloudbuild.yaml'))
  assert 'id: fetch-model' in build and '${_MODEL_URI}' in build  # what needs the read access


def test_the_exporting_page_starts_a_local_pgvector_the_export_accepts():
  from jobs.export_pgvector import PgvectorTarget
  section = _section('exporting.md', 'A PostgreSQL with pgvector on your machine')
  assert 'docker run' in section and 'pgvector/pgvector:pg17' in section
  [export] = [shlex.split(line) for verb, line in _commands(section) if verb == 'export']
  target = PgvectorTarget.from_url(export[export.index('--to') + 1])
  assert target.table == 'photos'
  assert target.conninfo == 'postgresql://postgres@127.0.0.1:5432/postgres'
