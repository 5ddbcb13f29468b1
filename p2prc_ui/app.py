"""The dashboard: server-rendered pages (Jinja2, autoescaped) over this node's services.

Who may use it: whoever holds the random token ``p2prc ui`` printed. It serves on an address
of its own (a random 127.A.B.C), so its cookie goes to no other local service. The token in
the URL becomes a cookie (HttpOnly, SameSite=Strict) and leaves the address bar, but only
where the user opened that address (a page of another origin cannot sign the browser in);
``p2prc ui`` opens the browser through a private file carrying a code that works once, so
the token is on no command line. Every request must carry the cookie and name this server
in its Host header (no DNS rebinding); every form that changes something carries a CSRF
token derived from the access token, and a cross-site Origin is refused; no page (a GET)
changes anything. Pages send a strict Content-Security-Policy: scripts and styles only from
this server, no inline script. Connections are capped in all and per source address, and a
request head must arrive within a few seconds.

Whatever a peer sent (names, GPU names, messages) is text: Jinja escapes it.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import html
import itertools
import logging
import mimetypes
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import falcon
import jinja2

from p2prc_core.containers import ContainerError, usage_of
from p2prc_core.errors import P2PRCError
from p2prc_core.services import NodeServices
from p2prc_core.text import format_ago, format_when, human_bytes, two_places
from p2prc_ui.files import send_inside
from p2prc_ui.jobs_page import JobsPage
from p2prc_ui.serving import Served, bind, hosts

HERE = Path(__file__).parent
COOKIE = "p2prc_ui_"  # and a hash of the token: two dashboards on one host keep their own
MAX_FORM = 16 << 10  # bytes of a form body
SORTS = {"score", "name", "latency", "bandwidth", "last_seen", "gpus", "trusted"}
log = logging.getLogger("p2prc.ui")


@dataclass
class UpdateJob:
    """A 'peers update' running in the background, with its progress."""

    hops: int
    done: int = 0
    total: int = 0
    hop: int = 1
    finished: float | None = None
    summary: dict[str, Any] | None = None
    error: str | None = None


class Dashboard:
    """The dashboard's state: the node's services, the access token, notes shown once
    after a form, and the update running in the background."""

    def __init__(self, services: NodeServices, token: str | None = None,
                 hosts: tuple[str, ...] = ()):
        self.services = services
        self.token = token or secrets.token_urlsafe(24)
        self.csrf = hmac.new(self.token.encode(), b"csrf", hashlib.sha256).hexdigest()
        self.cookie = COOKIE + hashlib.sha256(self.token.encode()).hexdigest()[:12]
        self.hosts = set(hosts)  # Host headers this server answers to (set by serve())
        self.once: str | None = None  # the code the opened browser comes in with, once
        self.notes: dict[str, tuple[str, str, dict[str, Any]]] = {}
        self.job: UpdateJob | None = None
        self._lock = threading.Lock()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
            undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(bytes=human_bytes, when=format_when, ago=format_ago,
                                two=two_places)

    def open_once(self) -> str:
        """A new code that signs one browser in, once, whichever page sent it here (the
        private file ``p2prc ui`` opens the browser with); the one before no longer works."""
        with self._lock:
            self.once = secrets.token_urlsafe(24)
            return self.once

    def take_once(self, given: str) -> bool:
        """Whether ``given`` is the code of ``open_once``; it works no more."""
        with self._lock:
            found = self.once is not None and _same(given, self.once)
            if found:
                self.once = None
            return found

    # -- rendering -------------------------------------------------------------------------

    def render(self, resp: falcon.Response, template: str, page: str, **values: Any) -> None:
        note = values.pop("note", None)
        resp.content_type = falcon.MEDIA_HTML
        resp.text = self.env.get_template(template).render(
            page=page, csrf=self.csrf, note=note, node_id=self.services.identity.node_id,
            name=self.services.settings.display_name, **values)

    def note(self, kind: str, text: str, **extra: Any) -> str:
        """Keep a message for the page a form redirects to; returns its id."""
        key = uuid.uuid4().hex[:16]
        with self._lock:
            self.notes[key] = (kind, text, extra)
            while len(self.notes) > 64:
                self.notes.pop(next(iter(self.notes)))
        return key

    def take_note(self, req: falcon.Request) -> dict[str, Any] | None:
        key = req.get_param("note") or ""
        with self._lock:
            found = self.notes.pop(key, None)
        if found is None:
            return None
        kind, text, extra = found
        return {"kind": kind, "text": text, **extra}

    # -- the background update -------------------------------------------------------------

    def start_update(self, hops: int) -> bool:
        """Start a table update unless one runs; False when one does."""
        with self._lock:
            if self.job is not None and self.job.finished is None:
                return False
            job = self.job = UpdateJob(hops)

        def progress(done: int, total: int, hop: int) -> None:
            job.done, job.total, job.hop = done, total, hop

        def run() -> None:
            try:
                job.summary = self.services.peers.update(hops, progress).as_dict()
            except Exception as err:  # noqa: BLE001 - shown on the page
                job.error = str(err)
            finally:
                job.finished = time.time()

        threading.Thread(target=run, name="p2prc-ui-update", daemon=True).start()
        return True


# -- access ----------------------------------------------------------------------------------

class Access:
    """The token, the Host header, and CSRF, checked before any resource runs."""

    def __init__(self, board: Dashboard):
        self.board = board

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        board = self.board
        host = req.get_header("Host") or ""
        if board.hosts and host not in board.hosts:
            raise falcon.HTTPForbidden(title="Wrong host",
                                       description="This dashboard answers only at the "
                                                   "address p2prc ui printed.")
        if req.method == "GET" and self._signs_in(req):
            self._sign_in(req, resp)
            return
        # A request a page of another origin made the browser send (a page on another port
        # of this address is "same-site", and gets our cookie): refused, reads included.
        fetched = req.get_header("Sec-Fetch-Site")
        if fetched is not None and fetched not in ("same-origin", "none"):
            raise falcon.HTTPForbidden(title="Cross-site request",
                                       description="Open the dashboard's address directly.")
        cookie = req.cookies.get(board.cookie, "")
        if not _same(cookie, board.token):
            raise falcon.HTTPForbidden(title="No access",
                                       description="Open the address 'p2prc ui' printed (it "
                                                   "carries this dashboard's token).")
        if req.method == "POST":
            origin = req.get_header("Origin")
            if origin and origin.split("://", 1)[-1] not in board.hosts | {host}:
                raise falcon.HTTPForbidden(title="Cross-site request",
                                           description="A form from another site.")
            if req.content_length and req.content_length > MAX_FORM:
                raise falcon.HTTPContentTooLarge(description="That form is too large.")
            form = falcon.uri.parse_query_string(req.bounded_stream.read(MAX_FORM).decode(
                errors="replace"), keep_blank=True)
            req.context.form = {k: v if isinstance(v, str) else v[0] for k, v in form.items()}
            if not _same(req.context.form.get("csrf", ""), board.csrf):
                raise falcon.HTTPForbidden(title="Stale form",
                                           description="Reload the page and try again.")

    def _signs_in(self, req: falcon.Request) -> bool:
        """Whether this request exchanges a secret for the cookie: the token, where the user
        opened its address, or the code the opened browser comes in with (once).

        :raises falcon.HTTPForbidden: the token, sent here by a page of another origin.
        """
        token, once = req.get_param("token"), req.get_param("open")
        if token is not None and _same(token, self.board.token):
            if not _users_own(req):
                raise falcon.HTTPForbidden(
                    title="Not opened by you",
                    description="Another page sent your browser here with the dashboard's "
                                "token: paste the address 'p2prc ui' printed into the "
                                "address bar yourself.")
            return True
        return once is not None and _top_level(req) and self.board.take_once(once)

    def _sign_in(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The cookie, and a page that moves on to the address asked for, without the
        secret (a browser's history keeps the first address: it is the user's own). The
        page moves on by itself: a navigation this origin starts, which carries the
        SameSite=Strict cookie even where the address was opened from elsewhere (a file)."""
        query = {k: v for k, v in req.params.items() if k not in ("token", "open")}
        target = "/" + req.path.lstrip("/\\") + ("?" + urlencode(query, doseq=True)
                                                 if query else "")
        resp.set_cookie(self.board.cookie, self.board.token, http_only=True,
                        same_site="Strict", secure=False, path="/")
        shown = html.escape(target)
        resp.content_type = falcon.MEDIA_HTML
        resp.text = (f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" '
                     f'content="0;url={shown}"><title>p2prc</title>'
                     f'<p><a href="{shown}">Open the dashboard</a></p>')
        resp.complete = True

    def process_response(self, req: falcon.Request, resp: falcon.Response,
                         resource: Any, req_succeeded: bool) -> None:
        resp.set_header("Content-Security-Policy",
                        "default-src 'none'; script-src 'self'; style-src 'self'; "
                        "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                        "frame-ancestors 'none'; base-uri 'none'")
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Referrer-Policy", "same-origin")  # no-referrer makes Origin null
        if req.path.startswith("/static/"):
            resp.set_header("Cache-Control", "max-age=3600")
        else:
            resp.set_header("Cache-Control", "no-store")
        # Pages of a large table shrink about tenfold.
        if "gzip" in (req.get_header("Accept-Encoding") or "") and isinstance(resp.text, str) \
                and len(resp.text) > 2048:
            resp.data = gzip.compress(resp.text.encode(), compresslevel=5)
            resp.text = None
            resp.set_header("Content-Encoding", "gzip")
            resp.append_header("Vary", "Accept-Encoding")


def _users_own(req: falcon.Request) -> bool:
    """A navigation the user made (typed, pasted, a bookmark, the browser started on it:
    ``Sec-Fetch-Site: none``) or a tool that is no browser made (no ``Sec-Fetch-Site``),
    not one a page made the browser make (a file:// page's counts as cross-site)."""
    return req.get_header("Sec-Fetch-Site") in (None, "none") and _top_level(req) and \
        req.get_header("Sec-Fetch-User") in (None, "?1")


def _top_level(req: falcon.Request) -> bool:
    """A page loaded in a tab, where the browser says (not an image, a fetch or a frame)."""
    return req.get_header("Sec-Fetch-Mode") in (None, "navigate") and \
        req.get_header("Sec-Fetch-Dest") in (None, "document")


def _same(given: str, secret: str) -> bool:
    """Constant-time equality of what a request carried and a secret (any text)."""
    return hmac.compare_digest(given.encode(errors="replace"), secret.encode())


def _form(req: falcon.Request, name: str, default: str = "") -> str:
    return str(req.context.form.get(name, default)).strip()


def _confirm(board: Dashboard, resp: falcon.Response, action: str, item: str, question: str,
             detail: str, button: str, back: str) -> None:
    """Ask before a destructive action (the script asks in a dialog instead)."""
    board.render(resp, "confirm.html", back.strip("/"), action=action, item=item,
                 question=question, detail=detail, button=button, back=back)


def _back(board: Dashboard, path: str, kind: str, text: str, **extra: Any) -> falcon.HTTPSeeOther:
    return falcon.HTTPSeeOther(f"{path}?note={board.note(kind, text, **extra)}")


# -- pages -----------------------------------------------------------------------------------

class Home:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        raise falcon.HTTPSeeOther("/peers")


class PeersPage:
    def __init__(self, board: Dashboard):
        self.board = board

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        sort = req.get_param("sort") or "score"
        sort = sort if sort in SORTS else "score"
        descending = req.get_param("order") == "desc"
        gpu = req.get_param_as_bool("gpu") or False
        rows = self.board.services.peers.rows(with_gpu=gpu)
        if sort != "score":
            column = {"latency": "latency_ms", "bandwidth": "bandwidth_mbps",
                      "gpus": "gpus_free"}.get(sort, sort)
            valued = [(_sortable(getattr(r, column)), r) for r in rows]
            rows = [r for _, r in sorted(((v, r) for v, r in valued if v is not None),
                                         key=lambda pair: pair[0], reverse=descending)]
            rows += [r for v, r in valued if v is None]  # "-" always last
        self.board.render(resp, "peers.html", "peers", rows=rows, sort=sort,
                          descending=descending, gpu=gpu, job=self.board.job,
                          note=self.board.take_note(req))

    def on_post_add(self, req: falcon.Request, resp: falcon.Response) -> None:
        address, name = _form(req, "address"), _form(req, "name") or None
        if not address:
            raise _back(self.board, "/peers", "error", "Give the peer's address.")
        try:
            entry, summary, endpoint = self.board.services.peers.add(address, name)
        except P2PRCError as err:
            raise _back(self.board, "/peers", "error", f"Could not add {address}: {err}",
                        address=address, given_name=name or "") from None
        raise _back(self.board, "/peers", "ok",
                    f"Added {entry.local_name or entry.name or entry.node_id} at {endpoint}; "
                    f"learned of {len(summary.added)} more.")

    def on_post_update(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            hops = max(1, min(8, int(_form(req, "hops") or
                                     self.board.services.settings.update_hops)))
        except ValueError:
            raise _back(self.board, "/peers", "error", "Hops is a number from 1 to 8.") \
                from None
        if not self.board.start_update(hops):
            raise _back(self.board, "/peers", "error", "An update is running already.")
        raise falcon.HTTPSeeOther("/peers")


def _sortable(value: Any) -> Any:
    """A column's value as it sorts: text without case; none (or empty text) is None."""
    return (value.lower() or None) if isinstance(value, str) else value


class ContainersPage:
    def __init__(self, board: Dashboard):
        self.board = board

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        states = self.board.services.on_peers.states()
        groups = self.board.services.tracked.groups()
        names = {e.node_id: e.local_name or e.name
                 for e in self.board.services.peers.entries().values()}
        self.board.render(resp, "containers.html", "containers", containers=[
            {"c": c, "state": state, "host": names.get(c.node_id or ""),
             "groups": [g for g, m in groups.items() if c.id in m]}
            for c, state in states], note=self.board.take_note(req))

    def on_post_remove(self, req: falcon.Request, resp: falcon.Response) -> None:
        text = _form(req, "id")
        if _form(req, "confirmed") != "1":
            _confirm(self.board, resp, "/containers/remove", text, f"Remove {text[:12]}?",
                     "It is stopped and removed on its host; what it held is lost.",
                     "Remove", "/containers")
            return
        try:
            entry = self.board.services.tracked.find(text)
            gone = not self.board.services.on_peers.remove(entry)
        except P2PRCError as err:
            raise _back(self.board, "/containers", "error", f"Could not remove {text}: {err}") \
                from None
        raise _back(self.board, "/containers", "ok",
                    f"{entry.short_id} was already gone from {entry.endpoint}; forgotten."
                    if gone else f"Removed {entry.short_id} from {entry.endpoint}.")


class HostPage:
    def __init__(self, board: Dashboard):
        self.board = board

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        services = self.board.services
        leases, usage, problem = [], {}, None
        try:
            service = services.hosting.service()
            leases = service.list_leases()
            usage = usage_of(service.backend, [lease.id for lease in leases
                                               if lease.state == "running"])
        except ContainerError as err:
            problem = str(err)
        trusted = services.trust.all()
        self.board.render(resp, "host.html", "host", leases=leases, usage=usage,
                          problem=problem, trusted=trusted,
                          server=services.own.running_server(), note=self.board.take_note(req))

    def on_post_kill(self, req: falcon.Request, resp: falcon.Response) -> None:
        text = _form(req, "id")
        if _form(req, "confirmed") != "1":
            _confirm(self.board, resp, "/host/kill", text, f"Kill {text[:12]}?",
                     "It is stopped and removed at once, whoever started it.", "Kill",
                     "/host")
            return
        try:
            lease = self.board.services.hosting.kill(text)
        except P2PRCError as err:
            raise _back(self.board, "/host", "error", f"Could not kill {text}: {err}") \
                from None
        raise _back(self.board, "/host", "ok", f"Killed {lease.id[:12]}.")

    def on_post_rename(self, req: falcon.Request, resp: falcon.Response) -> None:
        """A trusted node's name here (the same rule as 'p2prc trust NODE --name')."""
        node_id, name = _form(req, "id"), _form(req, "name")
        store = self.board.services.trust
        try:
            name = store.users_name(node_id, name)
            if not store.rename(node_id, name):
                raise P2PRCError(f"{node_id[:12]} is not trusted here")
        except P2PRCError as err:
            raise _back(self.board, "/host", "error", f"Could not rename: {err}") from None
        raise _back(self.board, "/host", "ok", f"{node_id[:12]} is now named {name}."
                    if name else f"{node_id[:12]} has no name here now.")

    def on_post_untrust(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Stop trusting a node (as 'p2prc untrust'), asked first."""
        node_id = _form(req, "id")
        store = self.board.services.trust
        shown = store.names().get(node_id) or node_id[:12]
        if _form(req, "confirmed") != "1":
            _confirm(self.board, resp, "/host/untrust", node_id, f"Stop trusting {shown}?",
                     "Its next request here is refused; what it runs here now keeps "
                     "running until it expires or you kill it.", "Untrust", "/host")
            return
        if not store.remove(node_id):
            raise _back(self.board, "/host", "error", f"{shown} was not trusted here.")
        raise _back(self.board, "/host", "ok", f"{shown} is no longer trusted here.")

    def on_post_invite(self, req: falcon.Request, resp: falcon.Response) -> None:
        from p2prc_core.models import parse_duration

        try:
            ttl = parse_duration(_form(req, "ttl") or "24h")
            address = _form(req, "address")
            offer = self.board.services.invites.create(ttl, [address] if address else None,
                                                       name=_form(req, "name"))
        except (P2PRCError, ValueError) as err:
            raise _back(self.board, "/host", "error", f"No invite: {err}") from None
        token = offer.token()
        text = (f"An invite for a friend: it works once, until {format_when(offer.expires)}. "
                f"Copy it now: it is shown only here.")
        if self.board.services.own.running_server() is None:
            text += (f" No p2prc server runs for this node: start it ('p2prc server') before "
                     f"your friend joins, on port {offer.port}.")
        raise _back(self.board, "/host", "invite", text, token=token, qr=_qr_svg(token))


def _qr_svg(text: str) -> str:
    """The QR code of ``text`` as an SVG data URI (made here, from our own token)."""
    import segno

    return str(segno.make(text, error="m").svg_data_uri(scale=4, border=2))


class RunsPage:
    def __init__(self, board: Dashboard):
        self.board = board

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        runs = list(reversed(self.board.services.runs.history.all()))[:200]
        self.board.render(resp, "runs.html", "runs", runs=runs)

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, run_id: str) -> None:
        run = self._run(run_id)
        root = self._artifacts(run_id, run)
        files = []
        if root is not None:
            for path in sorted(itertools.islice(root.rglob("*"), 2000))[:500]:
                if path.is_file() and not path.is_symlink():
                    name = str(path.relative_to(root))
                    files.append({"path": name, "size": path.stat().st_size,
                                  "event": "/job_events/" in name})
        self.board.render(resp, "run.html", "runs", run=run, files=files)

    def on_get_file(self, req: falcon.Request, resp: falcon.Response, run_id: str,
                    name: str) -> None:
        send_inside(resp, self._artifacts(run_id, self._run(run_id)), name,
                    f"No file {name} in run {run_id}.")

    def _artifacts(self, run_id: str, run: dict[str, Any]) -> Path | None:
        """The run's artifacts folder, only where it is inside this run's own folder."""
        own = (self.board.services.runs.history.root / run_id).resolve()
        where = run.get("artifacts")
        if not isinstance(where, str) or not where:
            return None
        found = Path(where).resolve()
        return found if found.is_relative_to(own) and found.is_dir() else None

    def _run(self, run_id: str) -> dict[str, Any]:
        try:
            return self.board.services.runs.history.get(run_id)
        except P2PRCError as err:
            raise falcon.HTTPNotFound(description=str(err)) from None


class SpecsPage:
    def __init__(self, board: Dashboard):
        self.board = board

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        peer = (req.get_param("peer") or "").strip()
        error, specs, where = None, {}, "this machine"
        holders: dict[int, list[str]] = {}
        if peer:
            where = peer
            try:
                with self.board.services.peers.client(peer, pin=False) as client:
                    specs, where = client.specs(), f"{peer} ({client.endpoint})"
            except P2PRCError as err:
                error = str(err)
        else:
            own = self.board.services.own
            specs, holders = own.specs_now(), own.gpu_holders()
        entries = list(self.board.services.peers.entries().values())[:200]
        names = sorted({str(e.local_name or e.name or e.node_id) for e in entries})
        self.board.render(resp, "specs.html", "specs", peer=peer, specs=_shaped(specs),
                          where=where, error=error, holders=holders, names=names)


def _shaped(specs: Any) -> dict[str, Any]:
    """A peer's specs, each part kept only in the shape the page expects."""
    specs = specs if isinstance(specs, dict) else {}

    def part(name: str) -> dict[str, Any]:
        value = specs.get(name)
        return value if isinstance(value, dict) else {}

    gpus = specs.get("gpus")
    return {"hostname": specs.get("hostname"), "os": part("os"), "cpu": part("cpu"),
            "memory": part("memory"), "disk": part("disk"), "load": part("load"),
            "gpus": [g for g in gpus if isinstance(g, dict)] if isinstance(gpus, list)
            else []}


class Static:
    FILES = {p.name for p in (HERE / "static").iterdir()}

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        if name not in self.FILES:
            raise falcon.HTTPNotFound()
        resp.content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        resp.text = (HERE / "static" / name).read_text()


def _error(req: falcon.Request, resp: falcon.Response, err: falcon.HTTPError,
           params: Any) -> None:
    resp.status = err.status
    resp.content_type = falcon.MEDIA_HTML
    title = jinja2.filters.escape(err.title or "Error")
    text = jinja2.filters.escape(err.description or "")
    resp.text = (f"<!doctype html><meta charset=utf-8><title>{title}</title>"
                 f"<h1>{title}</h1><p>{text}</p><p><a href=/peers>p2prc dashboard</a></p>")
    for key, value in dict(err.headers or {}).items():
        resp.set_header(key, value)


def create_app(board: Dashboard) -> falcon.App:
    app = falcon.App(middleware=[Access(board)])
    app.req_options.auto_parse_form_urlencoded = False
    app.add_error_handler(falcon.HTTPError, _error)  # type: ignore[arg-type]
    peers, containers, host, runs = (PeersPage(board), ContainersPage(board), HostPage(board),
                                     RunsPage(board))
    app.add_route("/", Home())
    app.add_route("/peers", peers)
    app.add_route("/peers/add", peers, suffix="add")
    app.add_route("/peers/update", peers, suffix="update")
    app.add_route("/containers", containers)
    app.add_route("/containers/remove", containers, suffix="remove")
    app.add_route("/host", host)
    app.add_route("/host/kill", host, suffix="kill")
    app.add_route("/host/invite", host, suffix="invite")
    app.add_route("/host/rename", host, suffix="rename")
    app.add_route("/host/untrust", host, suffix="untrust")
    app.add_route("/runs", runs)
    app.add_route("/runs/{run_id}", runs, suffix="one")
    app.add_route("/runs/{run_id}/files/{name:path}", runs, suffix="file")
    jobs = JobsPage(board)
    app.add_route("/jobs", jobs)
    app.add_route("/jobs/{job_id}", jobs, suffix="one")
    app.add_route("/jobs/{job_id}/kill", jobs, suffix="kill")
    app.add_route("/jobs/{job_id}/files/{name:path}", jobs, suffix="file")
    app.add_route("/specs", SpecsPage(board))
    app.add_route("/static/{name}", Static())
    return app


def serve(services: NodeServices, host: str | None = None, port: int = 0,
          ready: Callable[[Served], None] | None = None) -> None:
    """Serve the dashboard until interrupted, on ``host`` or else an address of its own;
    ``ready`` is told where (the addresses to open, with the token and with a code that
    works once)."""
    board = Dashboard(services)
    server, warning = bind(host, port, create_app(board))
    with server:
        address, bound = server.server_address[:2]
        board.hosts = hosts(address, bound)
        base = f"http://[{address}]:{bound}" if ":" in address else f"http://{address}:{bound}"
        if ready:
            ready(Served(f"{base}/?token={board.token}", f"{base}/?open={board.open_once()}",
                         warning))
        server.serve_forever()
