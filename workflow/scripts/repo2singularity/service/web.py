"""The web page: sign in once with the token (a signed cookie), a form for repository and ref,
the build's phases and live log (EventSource on the API's event stream), the SIF's download
link and the command that launches it on the cluster; launch URLs and a badge."""

import functools
import urllib.parse
from pathlib import Path

import tornado.web

from .api import COOKIE, COOKIE_DAYS, BaseHandler
from .build_request import BadRequest, check_url
from .git_access import GitAccess
from .queue import PHASES

BADGE = """<svg xmlns="http://www.w3.org/2000/svg" width="150" height="20" role="img" aria-label="build: SIF">
<title>build: SIF</title>
<rect rx="3" width="150" height="20" fill="#555"/><rect rx="3" x="46" width="104" height="20" fill="#3873b8"/>
<rect x="46" width="4" height="20" fill="#3873b8"/>
<g fill="#fff" text-anchor="middle" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11">
<text x="23" y="14">build</text><text x="97" y="14">repo2singularity</text></g></svg>
"""


@functools.cache
def self_signed_fingerprint(certificate_file):
    """The SHA-256 fingerprint (AA:BB:...) of the service's certificate when it is self-signed, as
    `setup.sh build-service` makes it: users then need that file to trust the service (and the
    page's commands name it); "" for a certificate a CA issued, or none."""
    if not certificate_file:
        return ""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    certificate = x509.load_pem_x509_certificate(Path(certificate_file).read_bytes())
    if certificate.issuer != certificate.subject:
        return ""
    return ":".join(f"{byte:02X}" for byte in certificate.fingerprint(hashes.SHA256()))


class WebHandler(BaseHandler):
    def check_xsrf_cookie(self):
        # the page's own forms (sign in, sign out) always carry the XSRF value
        tornado.web.RequestHandler.check_xsrf_cookie(self)

    def base_url(self):
        configured = self.service.settings["public_url"].rstrip("/")
        return configured or f"{self.request.protocol}://{self.request.host}"

    def sign_in_page(self, message="", status=200):
        self.set_status(status)
        _ = self.xsrf_token  # sets the XSRF cookie the form sends back
        self.render("sign_in.html", message=message, next_url=self.request.uri)

    def page(self, repo="", ref="", autostart=False, message=""):
        _ = self.xsrf_token
        self.render(
            "page.html",
            user=self.current_user,
            repo=repo,
            ref=ref,
            autostart=autostart,
            message=message,
            phases=PHASES,
            base_url=self.base_url(),
            self_signed=self_signed_fingerprint(self.service.settings["tls_cert"]),
        )


class PageHandler(WebHandler):
    def get(self):
        if self.current_user is None:
            return self.sign_in_page()
        self.page()


class SignInHandler(WebHandler):
    def get(self):
        self.redirect("/")

    def post(self):
        token = self.get_body_argument("token", "").strip()
        user = self.service.accounts.user_of_token(token)
        next_url = self.get_body_argument("next", "/")
        if not next_url.startswith("/") or next_url.startswith("//"):
            next_url = "/"
        if user is None:
            self.request.uri = next_url
            return self.sign_in_page("That token is not valid.", status=401)
        from .accounts import token_hash

        self.set_signed_cookie(
            COOKIE,
            token_hash(token),
            expires_days=COOKIE_DAYS,
            httponly=True,
            samesite="Strict",
            secure=self.request.protocol == "https",
        )
        self.redirect(next_url)


class SignOutHandler(WebHandler):
    def post(self):
        self.clear_cookie(COOKIE)
        self.redirect("/")


class LaunchHandler(WebHandler):
    """/v2/git/{url-quoted repo}/{ref}: the page, starting (or joining) that build."""

    def get(self, repo, ref):
        if self.current_user is None:
            return self.sign_in_page()
        try:
            check_url(repo, self.service.settings["allowed_schemes"])
            if GitAccess(repo).private:
                raise BadRequest("a launch URL cannot carry credentials; use the form")
        except BadRequest as error:
            self.set_status(400)
            return self.page(message=str(error))
        self.page(repo=repo, ref=ref, autostart=True)


class BadgeHandler(tornado.web.RequestHandler):
    """The badge is a picture only (a README shows it to anyone), so it needs no sign-in."""

    def get(self):
        self.set_header("Content-Type", "image/svg+xml")
        self.set_header("Cache-Control", "max-age=3600")
        self.finish(BADGE)


def launch_path(repo, ref):
    return f"/v2/git/{urllib.parse.quote(repo, safe='')}/{urllib.parse.quote(ref, safe='/')}"


def routes():
    return [
        (r"/", PageHandler),
        (r"/sign-in", SignInHandler),
        (r"/sign-out", SignOutHandler),
        (r"/v2/git/([^/]+)/(.*)", LaunchHandler),
        (r"/badge.svg", BadgeHandler),
    ]
