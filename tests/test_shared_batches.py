"""Shared-memory batches to a model in another process: exact, concurrent, and leaving nothing."""

import multiprocessing
import os
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest

from tests import shared_callers
from tests.shared_callers import (call_from_threads, call_undumpable, counting_server,
                                  grow_then_wait, images, segment_inodes, shared,
                                  shm_files)
from models.loading import load_embedding_model
from models.shared_batches import embed_batch
from transforms.embed import ImageEmbeddingModelHandler

SPAWN = multiprocessing.get_context('spawn')
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A model's process that may not open its callers' descriptors, the callers being undumpable:
# without CAP_SYS_PTRACE (root keeps it unless its bounding set drops it).
UNTRUSTED_SERVER = '''
import sys, time
from tests.shared_callers import shared
shared(sys.argv[1])
print('serving', flush=True)
time.sleep(600)
'''
NO_PTRACE = ['setpriv', '--bounding-set', '-sys_ptrace'] if os.geteuid() == 0 else []


def test_shared_path_is_bit_identical_to_in_process_path():
  """The tiny network in a process of its own, fed ragged batches through shared memory."""
  handler = ImageEmbeddingModelHandler('builtin:pnasnet_tiny', large_model=True)
  model = shared(f'identical_{uuid.uuid4().hex}', handler.load_model, spawn_process=True)
  in_process = load_embedding_model('builtin:pnasnet_tiny')
  for seed, size in enumerate([1, 3, 16, 2]):
    batch = images(seed, size, 64)
    features = [result.inference for result in handler.run_inference(batch, model)]
    np.testing.assert_array_equal(np.stack(features), in_process.embed(np.stack(batch)))


def test_several_processes_and_threads_at_once():
  tag = f'concurrent_{uuid.uuid4().hex}'
  shared(tag)  # the model's process is this one; the callers are three others and this one
  errors = SPAWN.Queue()
  callers = [SPAWN.Process(target=call_from_threads, args=(tag, caller, 3, 6, errors))
             for caller in range(3)]
  for caller in callers:
    caller.start()
  call_from_threads(tag, 3, 2, 6, errors)
  for caller in callers:
    caller.join(timeout=120)
  assert [caller.exitcode for caller in callers] == [0, 0, 0]
  assert errors.empty(), errors.get()


def test_mismatched_images_fail_the_batch_like_the_in_process_path():
  model = shared(f'mismatch_{uuid.uuid4().hex}')
  with pytest.raises(ValueError, match='same shape'):
    embed_batch(model, images(1, 2, 64) + images(2, 1, 32))
  assert embed_batch(model, images(3, 2, 64)).shape == (2, 4)  # the next batch goes through


def test_replaced_exited_and_killed_callers_leave_no_segment_behind():
  """Nothing ever in /dev/shm; the model's process unmaps a segment at its first call after the
  caller replaced it, exited or was killed, and the kernel then frees the memory file."""
  shm_before = shm_files()
  tag = f'cleanup_{uuid.uuid4().hex}'
  model = shared(tag)  # the model's process is this one: its maps are /proc/self/maps
  reports, leave, never = SPAWN.Queue(), SPAWN.Event(), SPAWN.Event()
  exiting = SPAWN.Process(target=grow_then_wait, args=(tag, reports, leave))
  killed = SPAWN.Process(target=grow_then_wait, args=(tag, reports, never))
  exiting.start()
  [small] = reports.get(timeout=120)
  [large] = reports.get(timeout=120)
  killed.start()
  reports.get(timeout=120)
  [killed_segment] = reports.get(timeout=120)
  assert small != large and {small, large, killed_segment} - segment_inodes() == {small}

  embed_batch(model, images(9, 1))
  assert small not in segment_inodes() and {large, killed_segment} <= segment_inodes()
  leave.set()
  exiting.join(timeout=60)
  os.kill(killed.pid, signal.SIGKILL)
  killed.join(timeout=60)
  embed_batch(model, images(10, 1))
  assert not {small, large, killed_segment} & segment_inodes()
  assert shm_files() == shm_before


def test_two_callers_never_run_two_batches_at_once():
  """Beam's manager serves every calling thread on a thread of its own: the model's lock keeps
  the GPU to one batch at a time."""
  tag = f'overlap_{uuid.uuid4().hex}'
  shared(tag, counting_server)  # served here, so the test reads the model's counts
  errors = SPAWN.Queue()
  callers = [SPAWN.Process(target=call_from_threads, args=(tag, caller, 2, 5, errors))
             for caller in range(2)]
  for caller in callers:
    caller.start()
  for caller in callers:
    caller.join(timeout=120)
  assert [caller.exitcode for caller in callers] == [0, 0] and errors.empty()
  [model] = shared_callers.counting_models
  assert model.calls == 2 * 2 * 5
  assert model.most_at_once == 1


def test_a_model_process_that_cannot_open_the_segments_gets_the_pixels_pickled():
  """The forced fallback: the model's process may not open its caller's /proc/PID/fd (a caller
  that is not dumpable, a model's process without CAP_SYS_PTRACE), as under a container runtime
  that forbids it."""
  tag = f'fallback_{uuid.uuid4().hex}'
  server = subprocess.Popen(NO_PTRACE + [sys.executable, '-c', UNTRUSTED_SERVER, tag], cwd=PROJECT,
                            text=True, stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=PROJECT))
  try:
    assert server.stdout.readline().strip() == 'serving'
    reports = SPAWN.Queue()
    caller = SPAWN.Process(target=call_undumpable, args=(tag, reports))
    caller.start()
    right, warnings, attached = reports.get(timeout=120)
    caller.join(timeout=60)
  finally:
    server.kill()
    server.wait(timeout=60)
  assert right == [True, True, True] and attached == 0
  assert len(warnings) == 1 and 'cannot open /proc/' in warnings[0], warnings
