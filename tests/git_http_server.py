"""A git server over smart HTTP with Basic authentication, for private-repository tests: git's
own `git http-backend` (CGI) behind a Tornado handler, on loopback in a thread of its own."""

import asyncio
import base64
import os
import subprocess
import threading

import tornado.httpserver
import tornado.ioloop
import tornado.netutil
import tornado.web


class GitBackendHandler(tornado.web.RequestHandler):
    def initialize(self, root, users, seen):
        self.root = root
        self.users = users
        self.seen = seen

    async def get(self, path):
        await self.backend(path)

    async def post(self, path):
        await self.backend(path)

    async def backend(self, path):
        header = self.request.headers.get("Authorization", "")
        user = None
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(name) == password:
                user = name
        self.seen.append((self.request.method, self.request.path, user, header != ""))
        if user is None:
            self.set_status(401)
            self.set_header("WWW-Authenticate", 'Basic realm="git"')
            return self.finish("authentication required\n")
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": "/" + path,
            "QUERY_STRING": self.request.query,
            "REQUEST_METHOD": self.request.method,
            "CONTENT_TYPE": self.request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(self.request.body)),
            "REMOTE_USER": user,
            "REMOTE_ADDR": "127.0.0.1",
        }
        if self.request.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.request.headers["Content-Encoding"]
        if self.request.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.request.headers["Git-Protocol"]
        result = await asyncio.to_thread(
            subprocess.run, ["git", "http-backend"], input=self.request.body, capture_output=True, env=env
        )
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(": ")
            if name.lower() == "status":
                self.set_status(int(value.split()[0]))
            elif name:
                self.set_header(name, value)
        self.finish(body)


class GitHttpServer:
    """Serves the bare repositories under `root` at http://ADDRESS:PORT/NAME.git (loopback unless
    `address` is given), to `users` ({name: password}) only; `seen` lists every request (method,
    path, user, had credentials)."""

    def __init__(self, root, users, address="127.0.0.1"):
        self.root = root
        self.users = users
        self.address = address
        self.seen = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def run(self):
        asyncio.set_event_loop(asyncio.new_event_loop())
        self.loop = tornado.ioloop.IOLoop.current()
        app = tornado.web.Application([(r"/(.*)", GitBackendHandler, {"root": self.root, "users": self.users, "seen": self.seen})])
        server = tornado.httpserver.HTTPServer(app)
        sockets = tornado.netutil.bind_sockets(0, self.address)
        server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.start()

    def url(self, name, user=None, password=None):
        credentials = f"{user}:{password}@" if user else ""
        return f"http://{credentials}{self.address}:{self.port}/{name}"

    def stop(self):
        self.loop.add_callback(self.loop.stop)
        self.thread.join(10)
