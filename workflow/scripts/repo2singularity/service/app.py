"""The server: Tornado's HTTP server (TLS from the settings) with the API and the web page,
one event loop, builds run as child processes; SIGTERM stops it cleanly."""

import logging
import secrets
import signal
import ssl
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tornado.httpserver
import tornado.ioloop
import tornado.netutil
import tornado.web

from .. import PROGRAM
from ..files import write_text_atomic
from . import api, web
from .accounts import Accounts
from .queue import BuildQueue
from .runner import WorkflowRunner

log = logging.getLogger("repo2singularity.service")
BUILD_ID = r"([0-9a-f]{16})"
# the JSON body is checked against 64 KiB itself (413 in one line); past this Tornado drops the connection
MAX_REQUEST_BYTES = 1 << 20


def routes():
    return [
        (r"/api/builds", api.BuildsHandler),
        (rf"/api/builds/{BUILD_ID}", api.BuildHandler),
        (rf"/api/builds/{BUILD_ID}/events", api.EventsHandler),
        (rf"/api/builds/{BUILD_ID}/sif", api.SifHandler),
        (rf"/api/builds/{BUILD_ID}/image", api.ImageHandler),
        (r"/api/users/me", api.MeHandler),
        (r"/api/.*", api.NotFoundHandler),
        *web.routes(),
    ]


def cookie_secret(work_dir):
    path = Path(work_dir) / "cookie_secret"
    if not path.exists():
        write_text_atomic(path, secrets.token_hex(32), mode=0o600)
    return path.read_text().strip()


def log_request(handler):
    """Tornado's access log, with the path only: a launch URL names a repository."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    path = handler.request.path
    if path.startswith("/v2/"):
        path = "/v2/..."
    user = getattr(handler, "_current_user", None)
    log.log(level, "%d %s %s %s %.1f ms", status, handler.request.method, path, user or "-", 1000 * handler.request.request_time())


def make_service(settings, runner=None):
    work_dir = Path(settings["work_dir"])
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if runner is None:
        runner = WorkflowRunner(settings["build_cores"], settings["workflow_config"], settings["registry"])
    queue = BuildQueue(
        work_dir / "builds",
        runner,
        settings["max_builds"],
        settings["max_builds_per_user"],
        settings["max_total_builds"],
    )
    queue.load()
    accounts = Accounts(work_dir / "users.json")
    return api.Service(settings, accounts, queue, ThreadPoolExecutor(max_workers=8, thread_name_prefix="resolve"))


def make_app(service):
    return tornado.web.Application(
        routes(),
        service=service,
        cookie_secret=cookie_secret(service.settings["work_dir"]),
        xsrf_cookies=True,
        xsrf_cookie_kwargs={"httponly": False, "samesite": "Strict", "secure": bool(service.settings["tls_cert"])},
        template_path=str(Path(__file__).with_name("templates")),
        log_function=log_request,
    )


def ssl_context(settings):
    if not settings["tls_cert"]:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings["tls_cert"], settings["tls_key"])
    return context


def listen(settings, runner=None):
    """The service, listening: (service, server, URL). Call on the event loop's thread."""
    service = make_service(settings, runner)
    server = tornado.httpserver.HTTPServer(
        make_app(service),
        ssl_options=ssl_context(settings),
        max_body_size=MAX_REQUEST_BYTES,
        idle_connection_timeout=300,
    )
    sockets = tornado.netutil.bind_sockets(settings["port"], settings["listen_address"])
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    scheme = "https" if settings["tls_cert"] else "http"
    host = settings["listen_address"]
    host = f"[{host}]" if ":" in host else host
    return service, server, f"{scheme}://{host}:{port}"


def serve(settings, runner=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    service, server, url = listen(settings, runner)
    print(f"{PROGRAM}-service: listening on {url}", flush=True)
    loop = tornado.ioloop.IOLoop.current()

    def stop(signum, frame):
        loop.add_callback_from_signal(shutdown)

    def shutdown():
        log.info("stopping: unfinished builds fail, their clients are told")
        service.stopping = True
        service.queue.stop()
        server.stop()
        # a moment for the event streams to send the final event
        loop.call_later(1.0, loop.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    loop.start()
