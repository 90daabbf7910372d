"""The JSON API (/api/...), as /work/PROTOCOL.md fixes it: every answer JSON, every error one line."""

import asyncio
import json
import logging
import os

import tornado.web
from tornado.iostream import StreamClosedError

from ..naming import default_name
from ..repository import RepositoryError
from . import build_request
from .build_request import BadRequest
from .git_access import GitAccess
from .queue import LimitReached

log = logging.getLogger("repo2singularity.service")
COOKIE = "r2s-user"
COOKIE_DAYS = 14


class BaseHandler(tornado.web.RequestHandler):
    """The signed-in user: a token in the Authorization header, or the sign-in cookie (the
    browser's EventSource cannot send headers). The cookie holds the token's hash, so a
    replaced token ends the sessions of the old one."""

    @property
    def service(self):
        return self.application.settings["service"]

    def get_current_user(self):
        header = self.request.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() not in ("token", "bearer"):
                return None
            return self.service.accounts.user_of_token(token.strip())
        digest = self.get_signed_cookie(COOKIE, max_age_days=COOKIE_DAYS)
        return self.service.accounts.user_of_hash(digest.decode()) if digest else None

    def check_xsrf_cookie(self):
        # a request with a token header cannot be forged by another site; a cookie's can (one
        # without either is refused as unauthenticated in prepare)
        if "Authorization" not in self.request.headers and self.get_cookie(COOKIE):
            super().check_xsrf_cookie()


class ApiHandler(BaseHandler):
    def prepare(self):
        if self.service.stopping:
            raise ApiError(503, "the build service is shutting down")
        if self.current_user is None:
            raise ApiError(401, "a valid token is required (Authorization: token TOKEN)")

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def write_error(self, status_code, **kwargs):
        error = kwargs.get("exc_info", (None, None))[1]
        if isinstance(error, ApiError):
            message = error.message
        elif isinstance(error, tornado.web.HTTPError) and error.log_message and status_code == 403:
            message = "the request's XSRF check failed (sign in again)"
        else:
            message = self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": message}))

    def visible_build(self, build_id):
        build = self.service.queue.get(build_id, self.current_user)
        if build is None:
            raise ApiError(404, f"no build {build_id}")
        return build

    def answer(self, data):
        self.finish(json.dumps(data))


class ApiError(tornado.web.HTTPError):
    def __init__(self, status, message):
        super().__init__(status, reason=None)
        self.message = message


class BuildsHandler(ApiHandler):
    async def post(self):
        try:
            build = await self.service.start_build(self.current_user, self.request.body)
        except BadRequest as error:
            raise ApiError(error.status, str(error)) from None
        except LimitReached as error:
            raise ApiError(429, str(error)) from None
        self.answer(self.service.queue.describe(build))


class BuildHandler(ApiHandler):
    def get(self, build_id):
        self.answer(self.service.queue.describe(self.visible_build(build_id)))


class EventsHandler(ApiHandler):
    """Server-sent events: the build's past events, then live ones, a heartbeat comment while
    nothing happens, and the end of the stream after built or failed."""

    def set_default_headers(self):
        self.set_header("Cache-Control", "no-store")

    async def get(self, build_id):
        build = self.visible_build(build_id)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("X-Accel-Buffering", "no")  # a proxy in front must not hold events back
        heartbeat = self.service.settings["heartbeat_seconds"]
        sent = 0
        try:
            while True:
                if sent < len(build.events):
                    for event in build.events[sent:]:
                        self.write(f"data: {json.dumps(event)}\n\n")
                    sent = len(build.events)
                    await self.flush()
                    continue
                if build.finished:
                    break
                if not await build.changed.wait(timeout=heartbeat_deadline(heartbeat)):
                    self.write(": heartbeat\n\n")
                    await self.flush()
        except StreamClosedError:
            return  # the client left; the build goes on
        self.finish()


def heartbeat_deadline(seconds):
    import datetime

    return datetime.timedelta(seconds=seconds)


class SifHandler(ApiHandler, tornado.web.StaticFileHandler):
    """The SIF with Content-Length, Range (206) and its sha256; only once built, so never a
    part of one."""

    def initialize(self):
        super().initialize(path="/")

    def set_default_headers(self):
        self.set_header("Cache-Control", "no-store")

    async def get(self, build_id, include_body=True):
        self.build = self.visible_build(build_id)
        if self.build.phase != "built":
            raise ApiError(409, f"build {build_id} is {self.build.phase}, not built")
        self.set_header("X-Sif-Sha256", self.build.sif_sha256)
        self.set_header("Content-Disposition", f'attachment; filename="{self.build.image_name}.sif"')
        await super().get(str(self.build.sif_path), include_body)

    def head(self, build_id):
        return self.get(build_id, include_body=False)

    def validate_absolute_path(self, root, absolute_path):
        if not os.path.isfile(absolute_path):
            raise ApiError(404, "the SIF of this build is gone from the service")
        return absolute_path

    def compute_etag(self):
        return f'"{self.build.sif_sha256}"'

    def get_content_type(self):
        return "application/octet-stream"

    def write_error(self, status_code, **kwargs):
        self.clear_header("Content-Disposition")
        self.clear_header("X-Sif-Sha256")
        ApiHandler.write_error(self, status_code, **kwargs)


class ImageHandler(ApiHandler):
    def get(self, build_id):
        build = self.visible_build(build_id)
        if build.phase != "built":
            raise ApiError(409, f"build {build_id} is {build.phase}, not built")
        try:
            self.answer(json.loads(build.image_json_path.read_text()))
        except (OSError, ValueError, AttributeError):
            raise ApiError(404, "the image.json of this build is gone from the service") from None


class MeHandler(ApiHandler):
    def get(self):
        self.answer({"name": self.current_user})


class Service:
    """What the handlers share: settings, accounts, the queue; and ref resolution, one
    `git ls-remote` for many identical requests at once."""

    def __init__(self, settings, accounts, queue, executor):
        self.settings = settings
        self.accounts = accounts
        self.queue = queue
        self.executor = executor
        self.resolving = {}
        self.stopping = False

    async def start_build(self, user, body):
        request = build_request.parse(body, self.settings["allowed_schemes"])
        access = GitAccess(request.url)
        sha = await self.resolve(access, request.ref)
        name = request.image_name or default_name(access.display_url)
        return self.queue.submit(user, access, request.ref, sha, name)

    async def resolve(self, access, ref):
        key = (access.display_url, access.credentials, ref)
        pending = self.resolving.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = self.resolving[key] = loop.run_in_executor(self.executor, access.resolve, ref)
            pending.add_done_callback(lambda _: self.resolving.pop(key, None))
        try:
            return (await asyncio.shield(pending)).sha
        except RepositoryError as error:
            raise BadRequest(str(error)) from None


class NotFoundHandler(ApiHandler):
    def prepare(self):
        super().prepare()
        raise ApiError(404, f"no such API path: {self.request.path[:80]}")
