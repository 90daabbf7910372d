"""A stand-in for `RUNTIME run ... jupyter notebook ...` in launch tests that need no image: it
reads the token from --env-file and answers GET /api/status on --ip/--port (200 with the token,
403 without). Like Jupyter, it moves on to the next port when its port is taken, unless told
--port-retries=0; with --ignore-port-retries it moves on anyway (a server that has no such
setting). Run as a program: python fake_jupyter.py ARGS..."""

import http.server
import socket
import sys
import threading


def option(args, name, default=None):
    for index, word in enumerate(args):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name and index + 1 < len(args):
            return args[index + 1]
    return default


def serve(args):
    env = dict(line.split("=", 1) for line in open(option(args, "--env-file")).read().split())
    token = env["JUPYTER_TOKEN"]

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.headers.get("Authorization") == f"token {token}" else 403)
            self.end_headers()

        def log_message(self, *_):
            pass

    host, port = option(args, "--ip", "127.0.0.1"), int(option(args, "--port"))
    retries = 50 if "--ignore-port-retries" in args else int(option(args, "--port-retries", "50"))
    for candidate in range(port, port + retries + 1):
        try:
            server = http.server.HTTPServer((host, candidate), Status)
        except OSError:
            print(f"The port {candidate} is already in use.", flush=True)
            continue
        print(f"listening on {host}:{candidate}", flush=True)
        server.serve_forever()
    print(f"ERROR: the server could not be started because port {port} is not available.", flush=True)
    sys.exit(1)


class Squatter:
    """Another program listening on a port first: it answers every request with 200 and keeps
    the Authorization headers it was sent."""

    def __init__(self, host="127.0.0.1"):
        received = self.received = []

        class Taker(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                received.append(self.headers.get("Authorization"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_):
                pass

        self.server = http.server.HTTPServer((host, 0), Taker)
        self.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def squat():
    """`--squat`: a Squatter that prints its port, then each Authorization header it receives."""
    squatter = Squatter()
    print(squatter.port, flush=True)
    seen = 0
    while True:
        threading.Event().wait(0.05)
        for header in squatter.received[seen:]:
            print(f"received: {header}", flush=True)
        seen = len(squatter.received)


if __name__ == "__main__":
    squat() if sys.argv[1:] == ["--squat"] else serve(sys.argv[1:])
