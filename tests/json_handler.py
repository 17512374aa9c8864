"""A base for the tests' small loopback HTTP servers that answer JSON (a fake Qdrant, a fake
Dataflow jobs API): quiet, one JSON body an answer."""

import http.server
import json


class JsonHandler(http.server.BaseHTTPRequestHandler):

  def send_json(self, value) -> None:
    body = json.dumps(value).encode()
    self.send_response(200)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass
