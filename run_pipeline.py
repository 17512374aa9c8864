"""Embeds images with PNASNet-5 Large: `python run_pipeline.py --help` lists every flag."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # keep TensorFlow's start-up chatter out

from pipeline.launcher import main  # noqa: E402  (after the environment is set)

if __name__ == '__main__':
  main()
