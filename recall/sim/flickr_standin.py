"""A local HTTP server that speaks the part of Flickr's REST API a photo crawl uses.

``FlickrStandIn`` serves, on 127.0.0.1 only:

- ``/services/rest/``: ``flickr.photos.search`` (GET or POST, as the ``flickrapi`` client sends it)
  with ``text``, ``page``, ``per_page`` (at most 500, like Flickr), ``extras`` (``url_c``,
  ``url_z``, ``url_n``, ``url_m``, ``url_q`` with their ``width_*``/``height_*``, ``license``,
  ``owner_name``, ``tags``), ``license`` (a comma list filter) and ``format=json``
  (``nojsoncallback=1``) or ``format=rest`` (XML). The API key is read from ``api_key`` or
  ``oauth_consumer_key`` (form, query or the OAuth ``Authorization`` header); signatures are not checked.
  Errors use Flickr's format and codes: ``{"stat": "fail", "code": 100, "message": ...}``.
- ``/photos/<server>/<id>_<secret>_<suffix>.jpg``: the photos.

Content: the text of a query is matched to a VOC class by its query (``web_query``, e.g.
"potted plant" → 16; the joined VOC name is accepted too). Result k of class c is photo k of
``ToyWebPhotos(size, seed, tag_noise)`` for c (``url_c`` at ``size`` pixels, the smaller sizes
scaled like Flickr's 800 / 640 / 320 / 240 / 150 px), with its owner, licence and tags. Like real
Flickr, ``MISSING_C_SHARE`` of the photos have no ``url_c`` (small originals) and some of those no
``url_z`` either, so a client's size fallback is exercised. Unknown text gives 0 results.

``faults`` (a ``Faults``; change it with ``inject``/``clear_faults``, thread-safe) makes the server
misbehave for tests: HTTP 5xx, 429 rate limits, slow answers, per-image latency, truncated / non-image /
tiny / broken images, repeated results, a network that dies after N images. ``plant`` puts given
image bytes at a result position (tests plant copies of dataset images to check the leakage guard).
``stats`` counts what was served.

Run it in the foreground with ``serve()`` (``recall flickr-standin``), or in a thread::

    with FlickrStandIn(size=64, seed=0) as standin:
        ...  # FlickrSource(endpoint="standin", rest_url=standin.rest_url)
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit
from xml.etree import ElementTree

from PIL import Image

from recall.data.classes import VOC_CLASSES, web_query
from recall.data.voc import PIL_ERRORS
from recall.errors import ReplayError
from recall.sim.toy_web import DEFAULT_PER_CLASS_LIMIT, ToyWebPhotos

log = logging.getLogger(__name__)

STANDIN_KEY = "standin-key"  # the key the stand-in always accepts (not a secret: it only opens this local server)
STANDIN_SECRET = "standin-secret"  # any secret is accepted; signatures are not checked
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765  # of ``serve``; a FlickrStandIn in a thread takes a free port (0)
REST_PATH = "/services/rest/"
PHOTO_PATH = "/photos/"
SEARCH_METHOD = "flickr.photos.search"
MAX_PER_PAGE = 500  # Flickr's own limit
DEFAULT_PER_PAGE = 100
MAX_BODY_BYTES = 64 * 1024  # a search request is a few hundred bytes
MAX_PER_CLASS_LIMIT = 999_999  # result indices take 6 digits of a photo id
REQUEST_TIMEOUT = 30.0  # seconds a handler waits for a slow client
JPEG_QUALITY = 90
RENDER_CACHE_BYTES = 64 * 2**20  # rendered photos kept in memory (LRU)
OWNER_NSID_DIGITS = 8
FARM = 66

# Flickr's size extras: (URL suffix, long side in px at Flickr, or None for the 150 px square).
SIZE_VARIANTS: dict[str, tuple[str, int | None]] = {
    "url_c": ("c", 800), "url_z": ("z", 640), "url_n": ("n", 320), "url_m": ("m", 240), "url_q": ("q", None)}
LARGEST_SIDE = 800  # url_c: the stand-in renders it at ``size`` and scales the others from it
SQUARE_SIDE = 150
# Share of photos without url_c (originals smaller than 800 px), of which MISSING_Z_SHARE also lack url_z.
MISSING_C_SHARE = 0.10
MISSING_Z_SHARE = 0.03
PLANTED_LICENSE = "4"
PLANTED_OWNER = "planted"
HTML_PAGE = b"<!DOCTYPE html><html><head><title>Flickr</title></head><body>This photo is unavailable.</body></html>"
TINY_SIDE = 4

# Flickr's error codes (https://www.flickr.com/services/api/flickr.photos.search.html).
ERR_PARAMETERLESS = 3
ERR_INVALID_KEY = 100
ERR_SERVICE_UNAVAILABLE = 105
ERR_METHOD_NOT_FOUND = 112
ERR_FORMAT_NOT_FOUND = 111
MESSAGES = {
    ERR_PARAMETERLESS: "Parameterless searches have been disabled. Please use flickr.photos.getRecent instead.",
    ERR_INVALID_KEY: "Invalid API Key (Key has invalid format)",
    ERR_SERVICE_UNAVAILABLE: "Service currently unavailable",
    ERR_METHOD_NOT_FOUND: 'Method "{method}" not found',
    ERR_FORMAT_NOT_FOUND: 'Format "{format}" not found',
}
FAULT_SCOPES = ("api", "images", "all")
_PHOTO_URL = re.compile(r"^/photos/(\d+)/(\d+)_([0-9a-f]+)_([a-z])\.jpg$")
_OAUTH_PARAM = re.compile(r'([a-z_]+)="([^"]*)"')


def photo_id(seed: int, class_index: int, index: int) -> str:
    """The id of the stand-in's result ``index`` for ``class_index``, numeric like Flickr's: "5", the seed (3
    digits), the class (2), the result index (6)."""
    return f"5{seed % 1000:03d}{class_index:02d}{index:06d}"


def parse_photo_id(photo_id: str, seed: int, per_class_limit: int) -> tuple[int, int] | None:
    """(class, result index) of a ``photo_id`` the stand-in of ``seed`` gave its rendered photos; None for any other
    id (a planted photo, another seed's, a real Flickr photo)."""
    if len(photo_id) != 12 or not photo_id.isdigit() or not photo_id.startswith("5") \
            or photo_id[1:4] != f"{seed % 1000:03d}":
        return None
    c, k = int(photo_id[4:6]), int(photo_id[6:])
    if not 1 <= c < len(VOC_CLASSES) or k >= per_class_limit:
        return None
    return c, k


@dataclass
class Faults:
    """What the stand-in does wrong. Counters (``http_errors``, ``rate_limits``, ``unavailable``,
    ``slow_requests``) apply to the next N requests of ``scope`` and count down."""

    http_errors: int = 0  # next N requests answer HTTP ``error_status``
    error_status: int = 503
    rate_limits: int = 0  # next N requests answer HTTP 429 with ``Retry-After: retry_after``
    retry_after: int = 0
    unavailable: int = 0  # next N API requests answer stat "fail", code 105 (HTTP 200), as Flickr does
    slow_requests: int = 0  # next N requests wait ``slow_seconds`` before answering (client timeouts)
    slow_seconds: float = 0.0
    scope: str = "api"  # which requests the counters above hit: "api", "images" or "all"
    latency_seconds: float = 0.0  # added to every image request (network latency, for benchmarks)
    truncated: set[str] = field(default_factory=set)  # photo ids served as the first half of their JPEG
    not_image: set[str] = field(default_factory=set)  # photo ids served as an HTML page
    tiny: set[str] = field(default_factory=set)  # photo ids served as a 4x4 JPEG
    broken: set[str] = field(default_factory=set)  # photo ids that always answer HTTP 503
    repeat: dict[int, int] = field(default_factory=dict)  # result position -> earlier position it repeats
    fail_after_images: int | None = None  # after N image requests admitted, every request answers HTTP 503


@dataclass(frozen=True)
class _Photo:
    """One search result as the stand-in lists it."""

    id: str
    secret: str
    server: str
    title: str
    owner: str
    ownername: str
    license: str
    tags: str
    sizes: dict[str, tuple[int, int]]  # size key -> (width, height)


def normalize_text(text: str) -> str:
    return " ".join(str(text).lower().split())


def query_classes() -> dict[str, int]:
    """Search text -> VOC class index: the paper's query (``web_query``) and the VOC name itself."""
    table: dict[str, int] = {}
    for c, name in enumerate(VOC_CLASSES[1:], start=1):
        table[normalize_text(web_query(name))] = c
        table[normalize_text(name)] = c
    return table


def _digest(*parts: object) -> bytes:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    return int.from_bytes(_digest(*parts)[:8], "big") / 2**64


def _variant_size(key: str, width: int, height: int) -> tuple[int, int]:
    """The size of variant ``key`` of a photo whose url_c is ``width`` x ``height``."""
    side = SIZE_VARIANTS[key][1]
    if side is None:  # the square crop
        square = max(1, round(min(width, height) * SQUARE_SIDE / LARGEST_SIDE))
        return square, square
    scale = side / LARGEST_SIDE
    return max(1, round(width * scale)), max(1, round(height * scale))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class FlickrStandIn:
    """The stand-in server (see the module docstring); ``start``/``stop`` or use it as a context manager."""

    KEY, SECRET = STANDIN_KEY, STANDIN_SECRET  # what a client without a key of its own sends

    def __init__(self, host: str = DEFAULT_HOST, port: int = 0, size: int = 64, seed: int = 0,
                 tag_noise: float = 0.15, per_class_limit: int = DEFAULT_PER_CLASS_LIMIT,
                 api_key: str | None = None, latency_seconds: float = 0.0) -> None:
        if not _is_loopback(host):
            raise ReplayError(f"flickr stand-in: host must be a loopback address (127.0.0.1), got {host!r}; "
                              f"the stand-in is a test server and never listens on a network interface")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ReplayError(f"flickr stand-in: port must be an integer in 0..65535 (0 = any free port), got {port!r}")
        if not isinstance(per_class_limit, int) or not 0 <= per_class_limit <= MAX_PER_CLASS_LIMIT:
            raise ReplayError(f"flickr stand-in: per_class_limit must be an integer in 0..{MAX_PER_CLASS_LIMIT}, "
                              f"got {per_class_limit!r}")
        self.host, self.port = host, port
        self.photos = ToyWebPhotos(size=size, seed=seed, tag_noise=tag_noise, per_class_limit=per_class_limit)
        self._api_key = api_key or STANDIN_KEY
        self._accepted = {STANDIN_KEY, self._api_key}
        self.faults = Faults(latency_seconds=float(latency_seconds))
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._queries = query_classes()
        self._meta: dict[tuple[int, int], dict] = {}
        self._renders: OrderedDict[tuple[int, int], Image.Image] = OrderedDict()
        self._render_bytes = 0
        self._filtered: dict[tuple[int, frozenset[str]], list[int]] = {}
        self._planted: dict[tuple[str, int], str] = {}  # (normalized query, position) -> planted photo id
        self._planted_bytes: dict[str, bytes] = {}
        self._server: _Server | None = None
        self._base_url = ""  # http://127.0.0.1:PORT, set by start()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = self.rest_url if self._server is not None else "not running"
        return f"FlickrStandIn({state}, {self.photos!r})"

    # ------------------------------------------------------------------ lifecycle
    @property
    def api_key(self) -> str:
        return self._api_key

    @property
    def rest_url(self) -> str:
        return f"{self.base_url}{REST_PATH}"

    @property
    def base_url(self) -> str:
        if not self._base_url:
            raise ReplayError("flickr stand-in: not started; call start() or use it as a context manager")
        return self._base_url

    @property
    def options(self) -> dict:
        """The content options (what a client's pool depends on)."""
        return self.photos.params

    def start(self) -> FlickrStandIn:
        if self._server is not None:
            return self
        try:
            server = _Server((self.host, self.port), _Handler)
        except OSError as error:
            raise ReplayError(f"flickr stand-in: cannot listen on {self.host}:{self.port} ({error}); "
                              f"choose another port (0 = any free port)") from error
        server.standin = self
        self._stopping.clear()
        self._server = server
        host, port = server.server_address[:2]
        self._base_url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="flickr-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # wakes handlers sleeping in a slow / latency fault
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._server, self._thread = None, None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults
    def inject(self, **changes) -> None:
        """Change ``faults`` atomically, e.g. ``inject(http_errors=2, error_status=502)``."""
        names = {f.name for f in fields(Faults)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ReplayError(f"flickr stand-in: unknown faults {unknown}; known: {sorted(names)}")
        if changes.get("scope", self.faults.scope) not in FAULT_SCOPES:
            raise ReplayError(f"flickr stand-in: fault scope must be one of {FAULT_SCOPES}, got {changes['scope']!r}")
        with self._lock:
            self.faults = replace(self.faults, **changes)

    def clear_faults(self) -> None:
        """No faults (the per-image latency is kept)."""
        with self._lock:
            self.faults = Faults(latency_seconds=self.faults.latency_seconds)

    def plant(self, query: str, position: int, jpeg_bytes: bytes) -> str:
        """Serve ``jpeg_bytes`` as result ``position`` (0-based) of ``query`` (replacing the toy photo there).

        Returns the planted photo's id.
        """
        if position < 0:
            raise ReplayError(f"flickr stand-in: plant position must be >= 0, got {position}")
        with self._lock:
            photo_id = f"7{len(self._planted_bytes):011d}"
            self._planted[(normalize_text(query), int(position))] = photo_id
            self._planted_bytes[photo_id] = bytes(jpeg_bytes)
        return photo_id

    def _take(self, counter: str, scope: str) -> bool:
        """Consume one unit of a counted fault if it applies to a request of ``scope``."""
        with self._lock:
            faults = self.faults
            if faults.scope not in ("all", scope) or getattr(faults, counter) <= 0:
                return False
            self.faults = replace(faults, **{counter: getattr(faults, counter) - 1})
            return True

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a fault), cut short when the server stops."""
        if seconds > 0:
            self._stopping.wait(seconds)

    # ------------------------------------------------------------------ content
    def photo_id(self, class_index: int, index: int) -> str:
        return photo_id(self.photos.seed, class_index, index)

    def _parse_toy_id(self, photo_id: str) -> tuple[int, int] | None:
        return parse_photo_id(photo_id, self.photos.seed, self.photos.per_class_limit)

    def _render(self, class_index: int, index: int) -> tuple[Image.Image, dict]:
        """Photo ``index`` of ``class_index`` and its meta, from a bounded LRU cache."""
        key = (class_index, index)
        with self._lock:
            if key in self._renders:
                self._renders.move_to_end(key)
                return self._renders[key], self._meta[key]
        image, meta = next(self.photos.images(class_index, VOC_CLASSES[class_index], index, 1))
        with self._lock:
            self._meta[key] = meta
            if key not in self._renders:
                self._renders[key] = image
                self._render_bytes += image.width * image.height * 3
            while self._render_bytes > RENDER_CACHE_BYTES and len(self._renders) > 1:
                _, old = self._renders.popitem(last=False)
                self._render_bytes -= old.width * old.height * 3
        return image, meta

    def _photo_meta(self, class_index: int, index: int) -> dict:
        with self._lock:
            meta = self._meta.get((class_index, index))
        return meta if meta is not None else self._render(class_index, index)[1]

    def _sizes(self, photo_id: str, width: int, height: int) -> dict[str, tuple[int, int]]:
        u = _unit("sizes", photo_id)
        keys = [k for k in SIZE_VARIANTS
                if not (k == "url_c" and u < MISSING_C_SHARE) and not (k == "url_z" and u < MISSING_Z_SHARE)]
        return {k: _variant_size(k, width, height) for k in keys}

    def _toy_photo(self, class_index: int, index: int) -> _Photo:
        meta = self._photo_meta(class_index, index)
        photo_id = self.photo_id(class_index, index)
        size = self.photos.size
        return _Photo(id=photo_id, secret=_digest("secret", photo_id).hex()[:10],
                      server=str(1000 + int(photo_id) % 9000), title=f"IMG_{index:04d}",
                      owner=self._nsid(meta["owner"]), ownername=meta["owner"], license=str(meta["license"]),
                      tags=meta["tags"], sizes=self._sizes(photo_id, size, size))

    def _planted_photo(self, photo_id: str, query: str) -> _Photo:
        try:
            with Image.open(io.BytesIO(self._planted_bytes[photo_id])) as image:
                width, height = image.size
        except PIL_ERRORS:
            width = height = self.photos.size
        return _Photo(id=photo_id, secret=_digest("secret", photo_id).hex()[:10], server="7000",
                      title="planted", owner=self._nsid(PLANTED_OWNER), ownername=PLANTED_OWNER,
                      license=PLANTED_LICENSE, tags=query, sizes={"url_c": (width, height)})

    @staticmethod
    def _nsid(owner: str) -> str:
        return f"{int.from_bytes(_digest('owner', owner)[:6], 'big') % 10**OWNER_NSID_DIGITS:0{OWNER_NSID_DIGITS}d}@N00"

    def _matching(self, class_index: int, licenses: frozenset[str]) -> list[int] | None:
        """Result indices of a class whose licence is in ``licenses`` (None: no filter)."""
        if not licenses:
            return None
        key = (class_index, licenses)
        if key not in self._filtered:  # renders every photo of the class once (meta is kept)
            self._filtered[key] = [k for k in range(self.photos.per_class_limit)
                                   if str(self._photo_meta(class_index, k)["license"]) in licenses]
        return self._filtered[key]

    def search(self, text: str, page: int, per_page: int, licenses: frozenset[str]) -> tuple[int, list[_Photo]]:
        """``(total, photos of the page)`` for a search."""
        query = normalize_text(text)
        class_index = self._queries.get(query)
        if class_index is None:
            return 0, []
        matching = self._matching(class_index, licenses)
        total = self.photos.per_class_limit if matching is None else len(matching)
        with self._lock:
            repeat = dict(self.faults.repeat)
        photos = []
        for position in range((page - 1) * per_page, min(page * per_page, total)):
            photos.append(self._at(query, class_index, matching, _resolve_repeat(position, repeat)))
        return total, photos

    def _at(self, query: str, class_index: int, matching: list[int] | None, position: int) -> _Photo:
        planted = self._planted.get((query, position))
        if planted is not None:
            return self._planted_photo(planted, query)
        index = position if matching is None else matching[position]
        return self._toy_photo(class_index, index)

    def image_bytes(self, photo_id: str, secret: str, suffix: str) -> bytes | None:
        """The JPEG of a photo variant, or None when there is no such photo."""
        if photo_id in self._planted_bytes:
            return self._planted_bytes[photo_id] if secret == _digest("secret", photo_id).hex()[:10] else None
        parsed = self._parse_toy_id(photo_id)
        if parsed is None or secret != _digest("secret", photo_id).hex()[:10]:
            return None
        image, _ = self._render(*parsed)
        key = next((k for k, (s, _) in SIZE_VARIANTS.items() if s == suffix), None)
        sizes = self._sizes(photo_id, image.width, image.height)
        if key not in sizes:
            return None
        width, height = sizes[key]
        if SIZE_VARIANTS[key][1] is None:  # the square: a centre crop
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return _jpeg(image)

    def photo_json(self, photo: _Photo, extras: set[str]) -> dict:
        entry: dict = {"id": photo.id, "owner": photo.owner, "secret": photo.secret, "server": photo.server,
                       "farm": FARM, "title": photo.title, "ispublic": 1, "isfriend": 0, "isfamily": 0}
        if "license" in extras:
            entry["license"] = photo.license
        if "owner_name" in extras:
            entry["ownername"] = photo.ownername
        if "tags" in extras:
            entry["tags"] = photo.tags
        for key, (width, height) in photo.sizes.items():
            if key in extras:
                suffix = SIZE_VARIANTS[key][0]
                entry[key] = f"{self.base_url}{PHOTO_PATH}{photo.server}/{photo.id}_{photo.secret}_{suffix}.jpg"
                entry[f"height_{suffix}"] = height
                entry[f"width_{suffix}"] = width
        return entry


def _resolve_repeat(position: int, repeat: dict[int, int]) -> int:
    """The position whose photo is shown at ``position`` (a repeat points to an earlier position)."""
    for _ in range(len(repeat) + 1):  # bounded: each step goes to an earlier position
        earlier = repeat.get(position)
        if earlier is None or not 0 <= earlier < position:
            return position
        position = earlier
    return position


class _Server(ThreadingHTTPServer):
    """The HTTP server: a daemon thread per connection; a handler's error is logged, not printed.

    Open (keep-alive) connections are tracked so that ``close_connections`` can end them: a stopped
    stand-in answers nothing, like a server that went away.
    """

    daemon_threads = True
    standin: FlickrStandIn

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by the client
                pass

    def handle_error(self, request, client_address) -> None:
        log.warning("flickr stand-in: error while answering %s", client_address[0], exc_info=sys.exc_info())


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback and ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    """One request of the stand-in: faults first, then the REST API or a photo."""

    server_version = "FlickrStandIn/1.0"
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this, keep-alive waits 40 ms

    @property
    def standin(self) -> FlickrStandIn:
        return self.server.standin

    def log_message(self, format: str, *args) -> None:
        log.debug("stand-in: %s %s", self.command, urlsplit(self.path).path)  # no query string: it may hold a key

    def do_GET(self) -> None:
        self._handle(body=b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._send(413, b"request too large", "text/plain")
            return
        self._handle(body=self.rfile.read(length) if length > 0 else b"")

    # ---------------------------------------------------------------- dispatch
    def _handle(self, body: bytes) -> None:
        standin = self.standin
        path = urlsplit(self.path).path
        scope = "api" if path == REST_PATH else "images"
        standin.count("requests")
        standin.count(scope)
        with standin._lock:  # check and admit in one step: concurrent downloads never pass the limit together
            limit = standin.faults.fail_after_images
            down = limit is not None and standin.stats["images_admitted"] >= limit
            if not down and scope == "images":
                standin.stats["images_admitted"] += 1
        if down:
            standin.count("network_down")
            self._send(503, b"Service Unavailable", "text/plain")
            return
        if standin._take("slow_requests", scope):
            standin.count("slow")
            standin.sleep(standin.faults.slow_seconds)
        if standin._take("http_errors", scope):
            standin.count("http_errors")
            self._send(standin.faults.error_status, b"injected error", "text/plain")
            return
        if standin._take("rate_limits", scope):
            standin.count("rate_limited")
            self._send(429, b"Too Many Requests", "text/plain", {"Retry-After": str(standin.faults.retry_after)})
            return
        if scope == "api":
            self._api(self._params(body))
        else:
            self._photo(path)

    def _params(self, body: bytes) -> dict[str, str]:
        """Query string, form body and the OAuth Authorization header, merged (first value of each)."""
        params: dict[str, str] = {}
        for source in (urlsplit(self.path).query, body.decode("utf-8", errors="replace")):
            for name, values in parse_qs(source, keep_blank_values=True).items():
                params.setdefault(name, values[0])
        authorization = self.headers.get("Authorization") or ""
        if authorization.startswith("OAuth "):
            for name, value in _OAUTH_PARAM.findall(authorization):
                params.setdefault(name, unquote(value))
        return params

    # ---------------------------------------------------------------- REST
    def _api(self, params: dict[str, str]) -> None:
        standin = self.standin
        response_format = params.get("format", "rest")
        if response_format not in ("json", "rest"):
            self._fail(params, ERR_FORMAT_NOT_FOUND, MESSAGES[ERR_FORMAT_NOT_FOUND].format(format=response_format))
            return
        key = params.get("api_key") or params.get("oauth_consumer_key")
        if key not in standin._accepted:
            standin.count("bad_key")
            self._fail(params, ERR_INVALID_KEY, MESSAGES[ERR_INVALID_KEY])
            return
        if standin._take("unavailable", "api"):
            standin.count("unavailable")
            self._fail(params, ERR_SERVICE_UNAVAILABLE, MESSAGES[ERR_SERVICE_UNAVAILABLE])
            return
        method = params.get("method", "")
        if method != SEARCH_METHOD:
            self._fail(params, ERR_METHOD_NOT_FOUND, MESSAGES[ERR_METHOD_NOT_FOUND].format(method=method))
            return
        text = params.get("text") or params.get("tags") or ""
        if not text.strip():
            self._fail(params, ERR_PARAMETERLESS, MESSAGES[ERR_PARAMETERLESS])
            return
        standin.count("searches")
        page = max(_int(params.get("page"), 1), 1)
        per_page = _int(params.get("per_page"), DEFAULT_PER_PAGE)
        per_page = DEFAULT_PER_PAGE if per_page < 1 else min(per_page, MAX_PER_PAGE)
        licenses = frozenset(x.strip() for x in params.get("license", "").split(",") if x.strip())
        extras = {x.strip() for x in params.get("extras", "").split(",") if x.strip()}
        total, photos = standin.search(text.replace(",", " "), page, per_page, licenses)
        pages = -(-total // per_page)
        payload = {"page": page, "pages": pages, "perpage": per_page, "total": total,
                   "photo": [standin.photo_json(p, extras) for p in photos]}
        self._ok(params, payload)

    def _ok(self, params: dict[str, str], photos: dict) -> None:
        if params.get("format") == "json":
            self._json(params, {"photos": photos, "stat": "ok"})
            return
        rsp = ElementTree.Element("rsp", stat="ok")
        element = ElementTree.SubElement(rsp, "photos", {k: str(v) for k, v in photos.items() if k != "photo"})
        for photo in photos["photo"]:
            ElementTree.SubElement(element, "photo", {k: str(v) for k, v in photo.items()})
        self._send(200, ElementTree.tostring(rsp, encoding="utf-8", xml_declaration=True), "text/xml; charset=utf-8")

    def _fail(self, params: dict[str, str], code: int, message: str) -> None:
        if params.get("format") == "json":
            self._json(params, {"stat": "fail", "code": code, "message": message})
            return
        rsp = ElementTree.Element("rsp", stat="fail")
        ElementTree.SubElement(rsp, "err", code=str(code), msg=message)
        self._send(200, ElementTree.tostring(rsp, encoding="utf-8", xml_declaration=True), "text/xml; charset=utf-8")

    def _json(self, params: dict[str, str], payload: dict) -> None:
        text = json.dumps(payload)
        if params.get("nojsoncallback") != "1":
            callback = params.get("jsoncallback") or "jsonFlickrApi"
            text = f"{re.sub(r'[^A-Za-z0-9_.]', '', callback)}({text})"
        self._send(200, text.encode(), "application/json; charset=utf-8")

    # ---------------------------------------------------------------- photos
    def _photo(self, path: str) -> None:
        standin = self.standin
        match = _PHOTO_URL.match(path)
        standin.sleep(standin.faults.latency_seconds)
        if match is None:
            standin.count("not_found")
            self._send(404, b"Not Found", "text/plain")
            return
        _, photo_id, secret, suffix = match.groups()
        with standin._lock:
            faults = standin.faults
        if photo_id in faults.broken:
            standin.count("http_errors")
            self._send(503, b"Service Unavailable", "text/plain")
            return
        data = standin.image_bytes(photo_id, secret, suffix)
        if data is None:
            standin.count("not_found")
            self._send(404, b"Not Found", "text/plain")
            return
        content_type = "image/jpeg"
        if photo_id in faults.truncated:
            data = data[: len(data) // 2]
        elif photo_id in faults.not_image:
            data, content_type = HTML_PAGE, "text/html; charset=utf-8"
        elif photo_id in faults.tiny:
            data = _jpeg(Image.new("RGB", (TINY_SIDE, TINY_SIDE), (128, 128, 128)))
        standin.count("images_served")
        standin.count("image_bytes", len(data))
        self._send(200, data, content_type)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. its timeout): nothing to do
            self.close_connection = True


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None and value != "" else default
    except ValueError:
        return default


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **options) -> None:
    """Run a stand-in in the foreground until Ctrl-C, printing its REST URL and key."""
    with FlickrStandIn(host=host, port=port, **options) as standin:
        print(f"Flickr stand-in at {standin.rest_url} ({standin.photos!r})\n"
              f"  its API key: {standin.api_key} (a local test key, not a Flickr key)\n"
              f"  use it: FLICKR_API_KEY={standin.api_key} recall pool replay=web "
              f"replay.source.rest_url={standin.rest_url}\n"
              f"Ctrl-C stops it.", flush=True)
        try:
            while not standin._stopping.wait(1.0):  # until Ctrl-C (or stop() from another thread)
                pass
        except KeyboardInterrupt:
            print("\nstopped", flush=True)


# ------------------------------------------------------------------------------ `recall flickr-standin`
def add_arguments(parser) -> None:
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--size", type=int, default=64, help="photo side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag-noise", type=float, default=0.15, help="share of results not showing the queried class")
    parser.add_argument("--per-class-limit", type=int, default=DEFAULT_PER_CLASS_LIMIT, help="results per query")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds of delay per photo (a slow network)")


def main(args) -> int:
    """Serve the stand-in on 127.0.0.1 until Ctrl-C."""
    serve(host=DEFAULT_HOST, port=args.port, size=args.size, seed=args.seed, tag_noise=args.tag_noise,
          per_class_limit=args.per_class_limit, latency_seconds=args.latency)
    return 0


if __name__ == "__main__":
    import sys

    from recall.commands import script

    sys.exit(script(__name__))
