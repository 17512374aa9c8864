"""The layering of docs/architecture.md, read from the source: no import runs back up."""

import ast
import os

import pytest

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('pnasnet', 'run_format', 'models', 'transforms', 'pipeline', 'embeddings')
# What each package may import of the project at module level (itself always).
MAY_IMPORT = {
    'pnasnet': set(),
    'run_format': set(),
    'models': {'pnasnet'},
    'transforms': {'models', 'run_format', 'pnasnet'},
    'pipeline': {'transforms', 'embeddings', 'models', 'run_format', 'pnasnet'},
    'embeddings': {'run_format'},
}
# Imported inside functions only, where a command needs them (embedding a query image).
MAY_IMPORT_LAZILY = {'embeddings': {'models', 'transforms'}}
NO_BEAM = ('pnasnet', 'run_format', 'embeddings')


def _imports(path: str):
  """(top-level module name, whether the import sits at module level) for each import."""
  tree = ast.parse(open(path).read(), path)
  module_level = {id(node) for node in tree.body}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [node.module]
    else:
      continue
    for name in names:
      yield name.split('.')[0], id(node) in module_level


def _sources(package: str):
  folder = os.path.join(PROJECT, package)
  return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith('.py'))


@pytest.mark.parametrize('package', PACKAGES)
def test_no_import_runs_back_up(package):
  wrong = []
  for path in _sources(package):
    for name, module_level in _imports(path):
      if name not in PACKAGES or name == package:
        continue
      allowed = MAY_IMPORT[package] | (set() if module_level else MAY_IMPORT_LAZILY.get(package, set()))
      if name not in allowed:
        wrong.append(f'{os.path.relpath(path, PROJECT)} imports {name}')
  assert not wrong


@pytest.mark.parametrize('package', NO_BEAM)
def test_packages_that_must_not_need_beam_do_not_import_it(package):
  assert not [path for path in _sources(package) for name, module_level in _imports(path)
              if name == 'apache_beam' and module_level]
