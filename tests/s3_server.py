"""A real S3-protocol server on loopback for tests: moto's standalone server, in a thread.

Beam's S3 FileSystem (boto3) reaches it through the pipeline options in `options`, exactly as a
user reaches MinIO or another S3-compatible store; nothing in boto3 or Beam is patched.
"""

import socket

import pytest


class S3Server:

  def __init__(self):
    from moto.server import ThreadedMotoServer
    with socket.socket() as probe:  # a free port; moto needs one up front
      probe.bind(('127.0.0.1', 0))
      self.port = probe.getsockname()[1]
    self._server = ThreadedMotoServer(ip_address='127.0.0.1', port=self.port, verbose=False)
    self.endpoint = f'http://127.0.0.1:{self.port}'
    self.options = [f'--s3_endpoint_url={self.endpoint}', '--s3_access_key_id=testing',
                    '--s3_secret_access_key=testing', '--s3_region_name=us-east-1']

  def start(self):
    self._server.start()
    import boto3
    self.client = boto3.client('s3', endpoint_url=self.endpoint, region_name='us-east-1',
                               aws_access_key_id='testing', aws_secret_access_key='testing')
    return self

  def stop(self):
    self._server.stop()

  def create_bucket(self, name: str):
    self.client.create_bucket(Bucket=name)

  def upload(self, uri: str, data: bytes):
    bucket, key = uri[len('s3://'):].split('/', 1)
    self.client.put_object(Bucket=bucket, Key=key, Body=data)

  def list(self, prefix_uri: str):
    bucket, prefix = prefix_uri[len('s3://'):].split('/', 1)
    pages = self.client.get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix=prefix)
    return sorted(f's3://{bucket}/{item["Key"]}' for page in pages
                  for item in page.get('Contents', []))


@pytest.fixture(scope='session')
def s3_server():
  server = S3Server().start()
  yield server
  server.stop()
