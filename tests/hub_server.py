"""A small Hugging Face Hub stand-in for the tests, on the loopback (127.0.0.1, random ports).

It speaks the part of the Hub's HTTP protocol that ``huggingface_hub`` uses to download and to
upload, so that the real client code runs (HEAD with ETag and commit headers, the redirect of
large files to a storage host, the cache, offline mode, retries, ``create_repo`` and the commit
endpoints behind ``upload_folder``):

* ``HEAD|GET /{org}/{name}/resolve/{revision}/{path}``: small files answer themselves (``ETag`` =
  the git blob id, ``X-Repo-Commit``, ``Content-Length``); ``.safetensors`` files are "LFS" files:
  a 302 to a second server on another port (the storage host) with ``X-Linked-Etag`` (their
  SHA-256), ``X-Linked-Size`` and ``X-Repo-Commit``, as the Hub redirects to its CDN.  Unknown
  repos, revisions and files get the Hub's 404s with ``X-Error-Code``.
* ``POST /api/repos/create``, ``POST /api/validate-yaml``,
  ``POST /api/models/{org}/{name}/preupload/{revision}`` (every file "regular") and
  ``POST /api/models/{org}/{name}/commit/{revision}`` (ndjson, base64 contents): a push lands in the
  served repo as a new commit, so it can be downloaded again.  Write calls need a token.

``HubServer.use(monkeypatch, tmp_path)`` points ``huggingface_hub`` at it for one test: it sets
``huggingface_hub.constants.ENDPOINT`` and the resolve-URL template (both are read from
``HF_ENDPOINT`` once, when ``huggingface_hub`` is imported; every call reads them again from the
module), turns offline mode off (the test session runs with ``HF_HUB_OFFLINE=1``) and gives the
test its own cache folder.  A fresh process can use the real variable: ``HubServer.env()``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

import pytest


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith('.safetensors')


class HubServer:
    """Repos in memory: ``repos[repo_id]`` is a list of commits ``(sha, {path: bytes})``, newest
    last; ``main`` is the newest.  ``requests`` logs ``(method, path)`` of every request."""

    def __init__(self) -> None:
        self.repos: Dict[str, List[Tuple[str, Dict[str, bytes]]]] = {}
        self.blobs: Dict[str, bytes] = {}          # sha256 -> bytes, served by the storage host
        self.corrupt: Dict[str, bytes] = {}        # sha256 -> other bytes sent in its place
        self.status: Optional[int] = None          # answer every resolve with this status (a Hub outage)
        self.requests: List[Tuple[str, str]] = []
        self.lock = threading.Lock()
        self._servers: List[ThreadingHTTPServer] = []

    # ---- content ----------------------------------------------------------------------------
    def commit(self, repo_id: str, files: Dict[str, bytes], replace: bool = False) -> str:
        """Add (or, with ``replace``, set) files in a new commit; returns its id."""
        with self.lock:
            history = self.repos.setdefault(repo_id, [])
            tree = {} if replace or not history else dict(history[-1][1])
            tree.update(files)
            sha = hashlib.sha1(f'{repo_id}:{len(history)}:{sorted(tree)}'.encode()).hexdigest()
            history.append((sha, tree))
            for path, data in files.items():
                if is_lfs(path):
                    self.blobs[hashlib.sha256(data).hexdigest()] = data
            return sha

    def upload_folder(self, repo_id: str, folder) -> str:
        folder = Path(folder)
        return self.commit(repo_id, {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()})

    def files(self, repo_id: str, revision: str = 'main') -> Dict[str, bytes]:
        return dict(self._tree(repo_id, revision)[1])

    def flip_byte(self, repo_id: str, path: str, offset: int = -3) -> None:
        """Serve ``path`` with one byte flipped (the storage host sends other bytes than the Hub lists)."""
        data = self.files(repo_id)[path]
        bad = bytearray(data)
        bad[offset] ^= 0x01
        self.corrupt[hashlib.sha256(data).hexdigest()] = bytes(bad)

    def _tree(self, repo_id: str, revision: str) -> Tuple[str, Dict[str, bytes]]:
        history = self.repos[repo_id]
        if revision == 'main':
            return history[-1]
        for sha, tree in history:
            if sha == revision:
                return sha, tree
        raise KeyError(revision)

    # ---- serving --------------------------------------------------------------------------
    def start(self) -> 'HubServer':
        for role in ('hub', 'storage'):
            srv = ThreadingHTTPServer(('127.0.0.1', 0), _handler(self, role))
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()
            self._servers.append(srv)
        return self

    def stop(self) -> None:
        """Stop listening: from now on connections are refused, as with a server that went down."""
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        self._servers = []

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self._ports[0]}'

    @property
    def storage(self) -> str:
        return f'http://127.0.0.1:{self._ports[1]}'

    @property
    def _ports(self) -> List[int]:
        if not hasattr(self, '_port_cache'):
            self._port_cache = [srv.server_address[1] for srv in self._servers]
        return self._port_cache

    def use(self, monkeypatch, tmp_path) -> 'HubServer':
        """Point this process's huggingface_hub at the server for one test (see the module docstring)."""
        from huggingface_hub import constants
        self._ports  # noqa: B018 - remember the ports before a test stops the server
        monkeypatch.setattr(constants, 'ENDPOINT', self.endpoint)
        monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE',
                            self.endpoint + '/{repo_id}/resolve/{revision}/{filename}')
        monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
        monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub-cache'))
        monkeypatch.setattr(constants, 'HF_HUB_DISABLE_PROGRESS_BARS', True, raising=False)
        return self

    def env(self, tmp_path) -> Dict[str, str]:
        """Environment variables that point a fresh process at the server."""
        return {'HF_ENDPOINT': self.endpoint, 'HF_HUB_OFFLINE': '0', 'HF_HUB_CACHE': str(tmp_path / 'hub-cache'),
                'HF_HUB_DISABLE_PROGRESS_BARS': '1', 'HF_HUB_DISABLE_TELEMETRY': '1'}


def _handler(hub: HubServer, role: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.0'  # one request per connection: nothing lingers when the server stops

        def log_message(self, *args) -> None:  # quiet; the requests are logged in hub.requests
            pass

        def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
                  head: bool = False, length: Optional[int] = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header('Content-Length', str(len(body) if length is None else length))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: Optional[Dict[str, str]] = None) -> None:
            self._send(status, json.dumps(obj).encode(), dict({'Content-Type': 'application/json'}, **(headers or {})))

        def _error(self, status: int, code: str, message: str, head: bool, extra: Optional[Dict[str, str]] = None):
            headers = {'X-Error-Code': code, 'X-Error-Message': message, **(extra or {})}
            if head:
                self._send(status, b'', headers, head=True)
            else:
                self._json(status, {'error': message}, headers)

        def do_HEAD(self) -> None:
            self._get(head=True)

        def do_GET(self) -> None:
            self._get(head=False)

        def _get(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append(('HEAD' if head else 'GET', path))
            if role == 'storage':
                sha = path.strip('/')
                if sha not in hub.blobs:
                    return self._send(404, b'no such object', head=head)
                data = hub.corrupt.get(sha, hub.blobs[sha])
                return self._send(200, data, {'ETag': f'"{sha}"', 'Content-Type': 'application/octet-stream'}, head)
            parts = path.strip('/').split('/')
            if len(parts) < 5 or parts[2] != 'resolve':
                return self._error(404, 'NotFound', f'{path}: not served here', head)
            if hub.status is not None:
                return self._send(hub.status, b'the Hub is down', head=head)
            repo_id, revision, file = '/'.join(parts[:2]), parts[3], '/'.join(parts[4:])
            if repo_id not in hub.repos:
                return self._error(404, 'RepoNotFound', f'Repository {repo_id} not found', head)
            try:
                sha, tree = hub._tree(repo_id, revision)
            except KeyError:
                return self._error(404, 'RevisionNotFound', f'Invalid rev id: {revision}', head)
            if file not in tree:
                return self._error(404, 'EntryNotFound', f'{file} does not exist on "{revision}"', head,
                                   {'X-Repo-Commit': sha})
            data = tree[file]
            if is_lfs(file):
                digest = hashlib.sha256(data).hexdigest()
                return self._send(302, b'', {'Location': f'{hub.storage}/{digest}', 'X-Repo-Commit': sha,
                                             'X-Linked-Etag': f'"{digest}"', 'X-Linked-Size': str(len(data)),
                                             'ETag': f'"{git_blob_id(data)}"'}, head)
            self._send(200, data, {'ETag': f'"{git_blob_id(data)}"', 'X-Repo-Commit': sha,
                                   'Content-Type': 'application/octet-stream'}, head)

        def do_POST(self) -> None:
            path = unquote(urlsplit(self.path).path)
            body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
            with hub.lock:
                hub.requests.append(('POST', path))
            if role != 'hub':
                return self._send(405)
            if not (self.headers.get('Authorization') or '').startswith('Bearer '):
                return self._error(401, 'Unauthorized', 'Invalid username or password.', False)
            parts = path.strip('/').split('/')
            if path == '/api/validate-yaml':
                return self._json(200, {'errors': [], 'warnings': []})
            if path == '/api/repos/create':
                req = json.loads(body)
                repo_id = f'{req.get("organization")}/{req["name"]}'
                if repo_id in hub.repos:
                    return self._json(409, {'error': 'You already created this model repo',
                                            'url': f'{hub.endpoint}/{repo_id}'})
                hub.repos[repo_id] = []
                hub.commit(repo_id, {'.gitattributes': b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n'})
                return self._json(200, {'url': f'{hub.endpoint}/{repo_id}', 'name': repo_id})
            if len(parts) == 6 and parts[:2] == ['api', 'models'] and parts[4] in ('preupload', 'commit'):
                repo_id = '/'.join(parts[2:4])
                if repo_id not in hub.repos:
                    return self._error(404, 'RepoNotFound', f'Repository {repo_id} not found', False)
                if parts[4] == 'preupload':
                    files = json.loads(body)['files']
                    return self._json(200, {'files': [{'path': f['path'], 'uploadMode': 'regular',
                                                       'shouldIgnore': False} for f in files]})
                return self._commit(repo_id, body)
            self._error(404, 'NotFound', f'{path}: not served here', False)

        def _commit(self, repo_id: str, body: bytes) -> None:
            files: Dict[str, bytes] = {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item['key'] == 'file':
                    files[item['value']['path']] = base64.b64decode(item['value']['content'])
                elif item['key'] != 'header':
                    return self._error(400, 'BadRequest', f'operation {item["key"]!r} is not served here', False)
            sha = hub.commit(repo_id, files)
            self._json(200, {'commitUrl': f'{hub.endpoint}/{repo_id}/commit/{sha}', 'commitOid': sha,
                             'pullRequestUrl': None, 'success': True})

    return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running :class:`HubServer` that this process's huggingface_hub talks to."""
    server = HubServer().start()
    server.use(monkeypatch, tmp_path)
    try:
        yield server
    finally:
        server.stop()
