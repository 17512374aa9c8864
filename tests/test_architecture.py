"""The layering of docs/architecture.md, read from the source: no import runs back up, and no two
modules or packages import each other, even through others."""

import ast
import os
import re

import pytest

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The floors, top first: what each package may import of the project at module level (itself
# always). docs/architecture.md draws the same table (test_the_architecture_page_draws_this_table).
MAY_IMPORT = {
    'commands': {'pipeline', 'jobs', 'embeddings', 'transforms', 'collection', 'models',
                 'storage', 'run_format', 'pnasnet'},
    'jobs': {'pipeline', 'transforms', 'embeddings', 'collection', 'storage', 'run_format'},
    'pipeline': {'transforms', 'collection', 'models', 'storage', 'run_format', 'pnasnet'},
    'embeddings': {'collection', 'storage', 'run_format'},
    'transforms': {'collection', 'models', 'storage', 'run_format', 'pnasnet'},
    'collection': {'storage', 'run_format'},
    'models': {'storage', 'pnasnet'},
    'storage': {'run_format'},
    'run_format': set(),
    'pnasnet': set(),
}
PACKAGES = tuple(MAY_IMPORT)
# Imported inside functions only, by one module: embedding a query image with the runs' model.
MAY_IMPORT_LAZILY = {'embeddings/query.py': {'models', 'transforms'}}
# No Beam at module level (a command's --help, the reading library, the network).
NO_BEAM = ('commands', 'embeddings', 'collection', 'storage', 'run_format', 'pnasnet')
# No Beam even lazily: the reading library reaches storage through storage/ alone.
NEVER_BEAM = {'embeddings': {'embeddings/query.py'}, 'collection': set()}  # package: excepted


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
      lazily = MAY_IMPORT_LAZILY.get(os.path.relpath(path, PROJECT), set())
      allowed = MAY_IMPORT[package] | (set() if module_level else lazily)
      if name not in allowed:
        wrong.append(f'{os.path.relpath(path, PROJECT)} imports {name}')
  assert not wrong


@pytest.mark.parametrize('package', NO_BEAM)
def test_packages_that_must_not_need_beam_do_not_import_it(package):
  assert not [path for path in _sources(package) for name, module_level in _imports(path)
              if name == 'apache_beam' and module_level]


@pytest.mark.parametrize('package', sorted(NEVER_BEAM))
def test_the_reading_library_imports_beam_nowhere_but_where_it_embeds(package):
  excepted = NEVER_BEAM[package]
  assert not [path for path in _sources(package) for name, _ in _imports(path)
              if name == 'apache_beam' and os.path.relpath(path, PROJECT) not in excepted]


def test_the_architecture_page_draws_this_table():
  """docs/architecture.md's arrows, `name/ ──> a/ b/; lazily, in FILE only: c/ d/`, are this
  test's tables."""
  page = open(os.path.join(PROJECT, 'docs', 'architecture.md')).read()
  drawn, lazily = {}, {}
  for match in re.finditer(r'^(\w+)/ +──> (.*)$', page, re.M):
    eager, _, lazy = match[2].partition('; lazily, in ')
    drawn[match[1]] = set(re.findall(r'(\w+)/', eager))
    if lazy:
      where, _, names = lazy.partition(' only: ')
      lazily[where] = set(re.findall(r'(\w+)/', names))
  assert drawn == MAY_IMPORT
  assert lazily == MAY_IMPORT_LAZILY
  assert list(drawn) == list(MAY_IMPORT), 'the page draws the floors top first'


def _module_name(path: str) -> str:
  name = os.path.splitext(os.path.relpath(path, PROJECT))[0].replace(os.sep, '.')
  return name[:-len('.__init__')] if name.endswith('.__init__') else name


MODULES = {_module_name(path) for package in PACKAGES for path in _sources(package)}


def _imported_modules(path: str):
  """(project module, whether the import sits at module level) for each import of `path`: `from
  package import name` is the module package.name when there is one, else the package."""
  tree = ast.parse(open(path).read(), path)
  module_level = {id(node) for node in tree.body}
  here = _module_name(path).split('.')
  if not path.endswith('__init__.py'):
    here = here[:-1]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = '.'.join(here[:len(here) - node.level + 1] + [node.module or ''] if node.level
                      else [node.module]).strip('.')
      targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in MODULES else base
                 for alias in node.names]
    else:
      continue
    for target in targets:
      while target and target not in MODULES:  # `import a.b.c`: the deepest project module
        target = target.rpartition('.')[0]
      if target:
        yield target, id(node) in module_level


def _cycle(graph: dict):
  """A cycle of `graph` ({node: nodes it points to}) as [a, b, ..., a], or None."""
  state = {}  # node -> 'open' while on the path, 'done' once every path from it is checked
  path = []

  def visit(node):
    state[node] = 'open'
    path.append(node)
    for other in sorted(graph.get(node, ())):
      if state.get(other) == 'open':
        return path[path.index(other):] + [other]
      if other not in state:
        found = visit(other)
        if found:
          return found
    path.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_cycle_finds_a_circle_and_only_one():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_no_import_circle_between_files():
  """Lazy imports count too: a command's lazy import of its job and the job's import of the
  command's module would make them one module in two files."""
  graph = {}
  for package in PACKAGES:
    for path in _sources(package):
      module = _module_name(path)
      graph[module] = {target for target, _ in _imported_modules(path)} - {module}
  circle = _cycle(graph)
  assert circle is None, 'import circle: ' + ' -> '.join(circle)


def test_no_import_circle_between_packages():
  """At module level: a package that another imports at import time never imports it back."""
  graph = {package: set() for package in PACKAGES}
  for package in PACKAGES:
    for path in _sources(package):
      graph[package] |= {name for name, module_level in _imports(path)
                         if module_level and name in PACKAGES and name != package}
  circle = _cycle(graph)
  assert circle is None, 'import circle: ' + ' -> '.join(circle)
