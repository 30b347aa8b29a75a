"""Web replay through the real ``flickrapi`` client: one text search per class, photos downloaded.

``FlickrSource`` is a replay source (``recall.replay.pool.ReplaySource``): for a class it searches
Flickr for the paper's query (``web_query``: the class name, "dining table", "potted plant", "tv
monitor" spelled out) and yields the downloaded photos of result positions ``start .. start+count-1``
(position = (page - 1) * per_page + i), in order, skipping those it cannot deliver. Photo k is the same
photo as long as Flickr's results are stable, so ``build_pool`` resumes a crawl where it stopped.

- ``endpoint="standin"`` starts a ``FlickrStandIn`` (``recall.sim.flickr_standin``) on 127.0.0.1 in
  this process, with its own key; ``rest_url`` points at another one (``recall flickr-standin``).
  ``endpoint="flickr"`` is api.flickr.com: the key and secret come from the environment only
  (``FLICKR_API_KEY``, ``FLICKR_API_SECRET``), never from a config file, and are never printed,
  logged (third-party debug logs included: they are redacted), stored in ``params``, in a record or
  in an error message.
- Robustness: HTTP 5xx, 429 (``Retry-After`` honoured, capped), timeouts, connection errors and
  Flickr's codes 10 / 105 ("service unavailable") are retried with exponential backoff, up to
  ``retries`` attempts per request. A search that still fails raises ``ReplayError`` (a re-run
  resumes: the pool keeps every image written). A photo that still fails is skipped
  (``download_failed``) — unless ``max_consecutive_failures`` downloads in a row fail, which means
  the network is gone: then the crawl stops with ``ReplayError``. A wrong key (code 100) or
  signature (96, 97, 98) stops at once.
- Skipped photos are counted in ``skipped`` by reason: ``bad_id`` (not [A-Za-z0-9_-]), ``bad_url``
  (not http/https), ``no_url`` (none of ``sizes`` present), ``duplicate_id`` (seen earlier in this
  crawl), ``download_failed``, ``unavailable`` (Flickr's "photo unavailable" placeholder),
  ``not_image``, ``corrupt`` (truncated / undecodable), ``too_small`` (shorter side < ``min_size``),
  ``too_large`` (more than ``max_pixels`` pixels or ``max_bytes`` bytes; PIL's own decompression-bomb
  guard stays on).

Downloads run on ``workers`` threads; results are still yielded in position order. File names are
made by the pool from its own counter, never from server strings.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import random
import re
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self, TypeVar
from urllib.parse import quote, urlsplit

import flickrapi
import requests
from flickrapi.exceptions import FlickrError
from PIL import Image

from recall.data.classes import web_query
from recall.registry import resolve
from recall.replay.images import (DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, ImageLimits, Skip,
                                  decode_image)
from recall.errors import ReplayError

log = logging.getLogger(__name__)

ENDPOINTS = ("standin", "flickr")
# endpoint=standin: the local Flickr stand-in (a simulation, outside the product: resolved by name when used)
STANDIN = "recall.sim.flickr_standin:FlickrStandIn"
FLICKR_REST_URL = flickrapi.FlickrAPI.REST_URL
SIZE_KEYS = ("url_o", "url_k", "url_h", "url_l", "url_b", "url_c", "url_z", "url_w", "url_n", "url_m", "url_q")
# Largest first. Flickr: c 800 px, z 640, n 320, m 240 (so n before m).
DEFAULT_SIZES = ("url_c", "url_z", "url_n", "url_m")
METADATA_EXTRAS = ("license", "owner_name", "tags")
FLICKR_MAX_PER_PAGE = 500
FLICKR_SEARCH_LIMIT = 4000  # Flickr's search returns no more than this many distinct results
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 5  # attempts per request
DEFAULT_BACKOFF = 1.0  # seconds before the 2nd attempt, doubled each time
DEFAULT_MAX_BACKOFF = 60.0
BACKOFF_JITTER = (0.5, 1.0)  # the wait is scaled by a random factor in this range, so workers do not retry in step
MAX_CONSECUTIVE_FAILURES = 10
DEFAULT_WORKERS = 4
IN_FLIGHT_PER_WORKER = 2  # downloads queued ahead of the one being yielded
DOWNLOAD_CHUNK = 64 * 1024
SEARCH_OPTIONS = {"media": "photos", "content_type": 1, "sort": "relevance", "safe_search": 1}
USER_AGENT = "recall-replay (research crawl; flickrapi 2.4.0)"

# Flickr API error codes.
RETRY_CODES = frozenset({10, 105})  # search API / service currently unavailable
KEY_CODES = frozenset({100})  # invalid API key
SIGNATURE_CODES = frozenset({96, 97, 98})  # invalid signature, missing signature, invalid auth token
RETRY_STATUS = frozenset({408, 429})  # and every 5xx
TRANSIENT_REQUEST_ERRORS = (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError)
CREDENTIAL_STATUS = frozenset({401, 403})
_STATUS_IN_MESSAGE = re.compile(r"Status code (\d{3})")
_SAFE_PHOTO_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LICENSE_LIST = re.compile(r"^\d+(,\d+)*$")
PLACEHOLDER_MARKER = "photo_unavailable"  # Flickr redirects a removed photo to .../photo_unavailable.png

SKIP_REASONS = ("bad_id", "bad_url", "corrupt", "download_failed", "duplicate_id", "no_url", "not_image",
                "too_large", "too_small", "unavailable")
STANDIN_OPTIONS = ("size", "seed", "tag_noise", "per_class_limit", "latency_seconds")
# Loggers that may print the key at DEBUG (OAuth headers and base strings) or a server's error body.
REDACTED_LOGGERS = ("flickrapi.core", "flickrapi.auth.OAuthFlickrInterface", "requests_oauthlib.oauth1_auth",
                    "oauthlib.oauth1.rfc5849", "oauthlib.oauth1.rfc5849.signature", "urllib3.connectionpool",
                    __name__)
REDACTED = "<redacted>"

T = TypeVar("T")


class _Transient(Exception):
    """A failure worth retrying; ``retry_after`` is the server's wish in seconds (None: unknown)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _GaveUp(Exception):
    """Every attempt failed; the message says what and the last error."""


@dataclass(frozen=True)
class _Outcome:
    """A download's result: an image and its meta, or the reason it was skipped."""

    image: Image.Image | None = None
    meta: dict | None = None
    reason: str | None = None
    detail: str = ""


class _Redactor(logging.Filter):
    """Replaces the key and secret (and their URL-encoded forms) in log records of the loggers it sits on."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        values = {s for s in secrets if s} | {quote(s, safe="") for s in secrets if s}
        self.secrets = sorted(values, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: let logging report it
            return True
        if any(s in message for s in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, REDACTED)
            record.msg, record.args = message, None
        return True


class _FlickrClient(flickrapi.FlickrAPI):
    """flickrapi's client at ``rest_url``, with its own HTTP session and a repr without the key."""

    def __init__(self, key: str, secret: str, rest_url: str, timeout: float) -> None:
        super().__init__(key, secret, format="parsed-json", store_token=False, cache=False, timeout=timeout)
        self.REST_URL = rest_url  # flickrapi 2.4.0 reads self.REST_URL per call: an instance attribute works
        # flickrapi shares one class-level session; ours records the last response's status and Retry-After
        # (flickrapi raises FlickrError("... Status code 429 received") and drops the headers).
        self.flickr_oauth.session = requests.Session()
        self.flickr_oauth.session.headers["User-Agent"] = USER_AGENT
        self.flickr_oauth.session.hooks["response"].append(self._remember)
        self.last_status: int | None = None
        self.last_retry_after: float | None = None

    def _remember(self, response: requests.Response, *args, **kwargs) -> None:
        self.last_status = response.status_code
        self.last_retry_after = parse_retry_after(response.headers.get("Retry-After"))

    def close(self) -> None:
        self.flickr_oauth.session.close()

    def __repr__(self) -> str:  # flickrapi's own repr shows the key (and flickrapi logs it at DEBUG)
        return "[FlickrAPI]"

    __str__ = __repr__


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class FlickrSource:
    """Replay photos from a Flickr text search per class (see the module docstring).

    ``retries`` is the number of attempts per request (1 = no retry). ``params`` holds what decides
    the pool's content (not the key, secret, timeouts or workers).
    """

    name = "web"

    def __init__(self, endpoint: str = "standin", rest_url: str | None = None,
                 queries: Mapping[str, str] | None = None, license: str = "",
                 sizes: Sequence[str] = DEFAULT_SIZES, per_page: int = 100,
                 max_results: int = FLICKR_SEARCH_LIMIT, min_size: int = DEFAULT_MIN_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                 max_backoff: float = DEFAULT_MAX_BACKOFF, workers: int = DEFAULT_WORKERS,
                 max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES,
                 key_env: str = "FLICKR_API_KEY", secret_env: str = "FLICKR_API_SECRET",
                 standin: Mapping[str, Any] | None = None) -> None:
        _check_options(endpoint, rest_url, queries, license, sizes, per_page, max_results, min_size, max_pixels,
                       max_bytes, timeout, retries, backoff, max_backoff, workers, max_consecutive_failures, standin)
        self.endpoint = endpoint
        self.rest_url = rest_url
        self.queries = {str(k): str(v) for k, v in (queries or {}).items()}
        self.license = str(license).replace(" ", "")
        self.sizes = tuple(sizes)
        self.per_page = int(per_page)
        self.max_results = int(max_results)
        self.min_size = int(min_size)
        self.max_pixels = int(max_pixels)
        self.max_bytes = int(max_bytes)
        self.limits = ImageLimits(min_size=self.min_size, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.workers = int(workers)
        self.max_consecutive_failures = int(max_consecutive_failures)
        self.key_env, self.secret_env = key_env, secret_env
        self.standin_options = dict(standin or {})
        self.skipped: Counter[str] = Counter()
        self._key, self._secret = self._credentials()
        self._redactor = _Redactor([self._key, self._secret])
        for name in REDACTED_LOGGERS:
            logging.getLogger(name).addFilter(self._redactor)
        self._standin = None  # the in-process stand-in server (endpoint=standin, no rest_url)
        self._client: _FlickrClient | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self._totals: dict[str, int] = {}
        self._pages: dict[tuple[str, int], list[dict]] = {}
        self._seen_ids: set[str] = set()
        self._consecutive_failures = 0
        self._closing = threading.Event()  # set by close(): cuts retry waits short

    def __repr__(self) -> str:
        where = self.rest_url or ("in-process stand-in" if self.endpoint == "standin" else FLICKR_REST_URL)
        return f"FlickrSource(endpoint={self.endpoint!r}, at={where!r}, workers={self.workers})"

    # ------------------------------------------------------------------ setup
    def _credentials(self) -> tuple[str, str]:
        """The key and secret: from the environment, or the stand-in's own.

        The in-process stand-in always gets its own key: a real key in the environment is never sent to it.
        """
        if self.endpoint == "standin":
            standin = resolve(STANDIN)
            if self.rest_url is None:
                return standin.KEY, standin.SECRET
            key, secret = os.environ.get(self.key_env, ""), os.environ.get(self.secret_env, "")
            return key or standin.KEY, secret or standin.SECRET
        key, secret = os.environ.get(self.key_env, ""), os.environ.get(self.secret_env, "")
        missing = [name for name, value in ((self.key_env, key), (self.secret_env, secret)) if not value]
        if missing:
            raise ReplayError(
                f"web replay: the Flickr API {'key and secret are' if len(missing) == 2 else 'credential is'} "
                f"missing: set the environment variable{'s' if len(missing) == 2 else ''} {' and '.join(missing)} "
                f"(e.g. `export {self.key_env}=... {self.secret_env}=...`; a key comes from "
                f"https://www.flickr.com/services/apps/create/). Keys are read from the environment only, "
                f"never from a config file.")
        return key, secret

    @property
    def params(self) -> dict:
        params = {"endpoint": self.endpoint, "rest_url": self.rest_url, "queries": dict(sorted(self.queries.items())),
                  "license": self.license, "sizes": list(self.sizes), "per_page": self.per_page,
                  "max_results": self.max_results, "min_size": self.min_size, "max_pixels": self.max_pixels,
                  "max_bytes": self.max_bytes}
        if self.endpoint == "standin" and self.rest_url is None:
            params["standin"] = self._standin_content()
        return params

    def _standin_content(self) -> dict:
        """The in-process stand-in's content options, defaults filled in (latency is not content)."""
        options = {k: v for k, v in self.standin_options.items() if k != "latency_seconds"}
        return {**resolve(STANDIN)().options, **options}

    def _api(self) -> _FlickrClient:
        if self._client is None:
            url = self.rest_url
            if url is None and self.endpoint == "standin":
                self._standin = resolve(STANDIN)(**self.standin_options).start()
                url = self._standin.rest_url
            self._client = _FlickrClient(self._key, self._secret, url or FLICKR_REST_URL, self.timeout)
        return self._client

    def query(self, class_name: str) -> str:
        """The search text of a class: an override from ``queries``, else the paper's ``web_query``."""
        return self.queries.get(class_name) or web_query(class_name)

    # ------------------------------------------------------------------ search
    def available(self, class_index: int, class_name: str) -> int:
        """Results the search reports for the class, capped by ``max_results``."""
        query = self.query(class_name)
        if query not in self._totals:
            self._page(query, 1)
        return min(self._totals[query], self.max_results)

    def _page(self, query: str, page: int) -> list[dict]:
        """The photos of one result page (cached for the current query)."""
        key = (query, page)
        if key not in self._pages:
            if any(q != query for q, _ in self._pages):  # keep only the current query's pages
                self._pages.clear()
            total, photos = self._search(query, page)
            self._totals.setdefault(query, total)
            self._pages[key] = photos
        return self._pages[key]

    def _search(self, query: str, page: int) -> tuple[int, list[dict]]:
        what = f"flickr.photos.search for {query!r}, page {page}"
        try:
            return self._retrying(what, lambda: self._search_once(query, page))
        except _GaveUp as error:
            raise ReplayError(f"web replay: {error}. Re-run the same command to resume: the pool keeps every "
                              f"image written so far.") from None

    def _search_once(self, query: str, page: int) -> tuple[int, list[dict]]:
        client = self._api()
        extras = ",".join([*METADATA_EXTRAS, *self.sizes])
        try:
            result = client.photos.search(text=query, page=page, per_page=self.per_page, extras=extras,
                                          license=self.license or None, **SEARCH_OPTIONS)
        except FlickrError as error:
            raise self._api_error(error, client) from None
        except TRANSIENT_REQUEST_ERRORS as error:
            raise _Transient(f"{type(error).__name__}: {error}") from None
        except requests.RequestException as error:  # e.g. too many redirects: retrying will not help
            raise ReplayError(f"web replay: flickr.photos.search for {query!r} failed: {type(error).__name__}: "
                              f"{error}") from None
        except (ValueError, KeyError) as error:  # not Flickr JSON (e.g. a proxy's HTML page with status 200)
            raise _Transient(f"the answer is not Flickr JSON ({type(error).__name__}: {error})") from None
        photos = result.get("photos") if isinstance(result, dict) else None
        if not isinstance(photos, dict) or not isinstance(photos.get("photo", []), list):
            raise _Transient(f"the answer has no 'photos' list: {str(result)[:200]}")
        try:
            total, returned_page = int(photos.get("total") or 0), int(photos.get("page") or page)
        except (TypeError, ValueError):
            raise _Transient(f"the answer has a bad 'total' or 'page': {str(photos)[:200]}") from None
        if returned_page != page:  # past the last page Flickr answers with another page: no more results
            return total, []
        return total, [p for p in photos.get("photo", []) if isinstance(p, dict)]

    def _api_error(self, error: FlickrError, client: _FlickrClient) -> Exception:
        """A FlickrError as a ``_Transient`` to retry, or a ``ReplayError`` that stops the crawl."""
        code = error.code
        if code in KEY_CODES:
            return ReplayError(f"web replay: Flickr refused the API key ({error}); check the environment variable "
                               f"{self.key_env} (the key of a Flickr app, https://www.flickr.com/services/apps/)")
        if code in SIGNATURE_CODES:
            return ReplayError(f"web replay: Flickr refused the request signature ({error}); check that "
                               f"{self.secret_env} holds the secret of the key in {self.key_env}")
        if code in RETRY_CODES:
            return _Transient(str(error))
        if code is not None:
            return ReplayError(f"web replay: Flickr answered {error}; this is not a transient problem "
                               f"(check the search options: queries, license, per_page)")
        match = _STATUS_IN_MESSAGE.search(str(error))  # flickrapi: "do_request: Status code 503 received"
        status = int(match.group(1)) if match else client.last_status
        if status in CREDENTIAL_STATUS:
            return ReplayError(f"web replay: the REST endpoint answered HTTP {status} (unauthorized); check the "
                               f"environment variables {self.key_env} and {self.secret_env}")
        if status is None or status >= 500 or status in RETRY_STATUS:
            return _Transient(f"HTTP {status}" if status else str(error), retry_after=client.last_retry_after)
        return ReplayError(f"web replay: the REST endpoint answered HTTP {status} ({error})")

    # ------------------------------------------------------------------ retries
    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, retried on ``_Transient`` up to ``retries`` attempts with exponential backoff."""
        last: _Transient | None = None
        for attempt in range(self.retries):
            if last is not None:
                delay = self._delay(attempt, last.retry_after)
                log.info("%s failed (%s); attempt %d of %d in %.2f s", what, last, attempt + 1, self.retries, delay)
                if self._closing.wait(delay):
                    raise _GaveUp(f"{what} cancelled: the source was closed (last error: {last})")
            try:
                return call()
            except _Transient as error:
                last = error
        raise _GaveUp(f"{what} failed after {self.retries} attempt{'s' if self.retries != 1 else ''} "
                      f"(last error: {last})")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before attempt ``attempt`` (1-based count of failures so far), capped by ``max_backoff``."""
        delay = self.backoff * 2 ** (attempt - 1) * random.uniform(*BACKOFF_JITTER)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.max_backoff)

    # ------------------------------------------------------------------ images
    def images(self, class_index: int, class_name: str, start: int, count: int
               ) -> Iterator[tuple[Image.Image, dict]]:
        """``(RGB image, meta)`` for result positions ``start .. start + count - 1``, in order; undeliverable ones skipped."""
        query = self.query(class_name)
        stop = min(start + count, self.available(class_index, class_name))
        yield from self._in_order(self._candidates(query, max(start, 0), stop), query)

    def _candidates(self, query: str, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        """``(position, photo)`` of the results to download: safe ids, each photo once per crawl."""
        for position in range(start, stop):
            page, i = divmod(position, self.per_page)
            photos = self._page(query, page + 1)
            if i >= len(photos):  # Flickr returned a short page: nothing at this position
                continue
            photo = photos[i]
            photo_id = str(photo.get("id", ""))
            if not _SAFE_PHOTO_ID.match(photo_id):
                self.skipped["bad_id"] += 1
                log.warning("web replay: result %d of %r has an unusable photo id %r; skipped",
                            position, query, photo_id[:80])
                continue
            if photo_id in self._seen_ids:
                self.skipped["duplicate_id"] += 1
                continue
            self._seen_ids.add(photo_id)
            yield position, photo

    def _in_order(self, candidates: Iterator[tuple[int, dict]], query: str) -> Iterator[tuple[Image.Image, dict]]:
        """Download on the worker threads, a bounded window ahead; yield in position order."""
        executor = self._pool()
        window: deque[Future] = deque()
        limit = self.workers * IN_FLIGHT_PER_WORKER

        def refill() -> None:
            while len(window) < limit:
                item = next(candidates, None)
                if item is None:
                    return
                window.append(executor.submit(self._download, item[0], item[1], query))

        try:
            refill()
            while window:
                outcome = window.popleft().result()
                if outcome.image is not None:
                    self._consecutive_failures = 0
                    yield outcome.image, outcome.meta
                else:
                    self._skip(outcome)
                refill()
        finally:
            for future in window:
                future.cancel()

    def _skip(self, outcome: _Outcome) -> None:
        self.skipped[outcome.reason] += 1
        if outcome.reason != "download_failed":
            log.debug("web replay: skipped (%s): %s", outcome.reason, outcome.detail)
            return
        log.warning("web replay: %s; skipped", outcome.detail)
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.max_consecutive_failures:
            raise ReplayError(f"web replay: {self._consecutive_failures} photo downloads in a row failed (last: "
                              f"{outcome.detail}); the network or the photo server seems down. Re-run the same "
                              f"command to resume: the pool keeps every image written so far.")

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="flickr-download")
        return self._executor

    def _session(self) -> requests.Session:
        """This thread's HTTP session (requests sessions are not shared between threads)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _download(self, position: int, photo: dict, query: str) -> _Outcome:
        """Fetch and decode one result (on a worker thread); never raises for a bad photo."""
        photo_id = str(photo["id"])
        size_key = next((k for k in self.sizes if isinstance(photo.get(k), str) and photo[k]), None)
        if size_key is None:
            return _Outcome(reason="no_url", detail=f"photo {photo_id}: none of {list(self.sizes)} in the result")
        url = photo[size_key]
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return _Outcome(reason="bad_url", detail=f"photo {photo_id}: {size_key} is not an http(s) URL")
        reported = _reported_size(photo, size_key)
        if reported is not None:
            rejected = self.limits.size_problem(*reported)
            if rejected is not None:
                return _Outcome(reason=rejected, detail=f"photo {photo_id}: {size_key} is {reported[0]}x{reported[1]}")
        try:
            data = self._retrying(f"download of photo {photo_id} ({url})", lambda: self._fetch(url))
        except _GaveUp as error:
            return _Outcome(reason="download_failed", detail=str(error))
        except Skip as skip:
            return _Outcome(reason=skip.reason, detail=f"photo {photo_id}: {skip.detail}")
        try:
            decoded = decode_image(data, self.limits)
        except Skip as skip:
            return _Outcome(reason=skip.reason, detail=f"photo {photo_id}: {skip.detail}")
        owner = photo.get("ownername") or photo.get("owner")
        meta = {"index": position, "source_class": query, "query": query, "photo_id": photo_id,
                "source_id": photo_id, "owner": None if owner is None else str(owner),
                "license": None if photo.get("license") is None else str(photo["license"]),
                "tags": str(photo.get("tags") or ""), "url": url, "size_key": size_key,
                "file_sha256": hashlib.sha256(data).hexdigest()}
        return _Outcome(image=decoded, meta=meta)

    def _fetch(self, url: str) -> bytes:
        """The bytes at ``url``: ``_Transient`` for what a retry may fix, ``_Skip`` for what it will not."""
        try:
            with self._session().get(url, stream=True, timeout=self.timeout) as response:
                status = response.status_code
                if status >= 500 or status in RETRY_STATUS:
                    raise _Transient(f"HTTP {status}", retry_after=parse_retry_after(response.headers.get("Retry-After")))
                if status != 200:
                    raise Skip("download_failed", f"HTTP {status}")
                if response.history and PLACEHOLDER_MARKER in response.url:
                    raise Skip("unavailable", "redirected to Flickr's 'photo unavailable' placeholder")
                if (response.headers.get("Content-Type") or "").lower().startswith("text/"):
                    raise Skip("not_image", f"served as {response.headers['Content-Type']}")
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise Skip("too_large", f"{declared} bytes > max_bytes {self.max_bytes}")
                return self._read(response)
        except TRANSIENT_REQUEST_ERRORS as error:
            raise _Transient(f"{type(error).__name__}: {error}") from None
        except requests.RequestException as error:  # redirect loops, bad encodings, non-http redirects
            raise Skip("download_failed", f"{type(error).__name__}: {error}") from None

    def _read(self, response: requests.Response) -> bytes:
        buffer = bytearray()
        for chunk in response.iter_content(DOWNLOAD_CHUNK):  # bounded by max_bytes
            buffer.extend(chunk)
            if len(buffer) > self.max_bytes:
                raise Skip("too_large", f"more than max_bytes {self.max_bytes} bytes")
        return bytes(buffer)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the downloads, close the HTTP sessions and the in-process stand-in."""
        self._closing.set()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._standin is not None:
            self._standin.stop()
            self._standin = None
        for name in REDACTED_LOGGERS:
            logging.getLogger(name).removeFilter(self._redactor)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reported_size(photo: dict, size_key: str) -> tuple[int, int] | None:
    """The width and height the search reported for ``size_key`` (url_c -> width_c, height_c), if any."""
    suffix = size_key[len("url_"):]
    try:
        return int(photo[f"width_{suffix}"]), int(photo[f"height_{suffix}"])
    except (KeyError, TypeError, ValueError):
        return None


def _check_options(endpoint, rest_url, queries, license, sizes, per_page, max_results, min_size, max_pixels,
                   max_bytes, timeout, retries, backoff, max_backoff, workers, max_consecutive_failures,
                   standin) -> None:
    """Raise ``ReplayError`` naming the first bad option and what it should be."""
    def bad(name: str, value: Any, expected: str) -> ReplayError:
        return ReplayError(f"web replay: {name} must be {expected}, got {value!r}")

    if endpoint not in ENDPOINTS:
        raise bad("endpoint", endpoint, f"one of {ENDPOINTS} (standin: the local stand-in; flickr: api.flickr.com)")
    if rest_url is not None and (not isinstance(rest_url, str) or urlsplit(rest_url).scheme not in ("http", "https")
                                 or not urlsplit(rest_url).netloc):
        raise bad("rest_url", rest_url, "an http(s) URL such as http://127.0.0.1:8765/services/rest/, or null")
    if queries is not None and (not isinstance(queries, Mapping)
                                or not all(isinstance(v, str) and v.strip() for v in queries.values())):
        raise bad("queries", queries, "a mapping class name -> non-empty search text")
    if not isinstance(license, str) or (license.replace(" ", "") and not _LICENSE_LIST.match(license.replace(" ", ""))):
        raise bad("license", license, 'comma-separated Flickr licence ids such as "1,2,4,5,9,10", or "" for any')
    if isinstance(sizes, str) or not sizes or any(s not in SIZE_KEYS for s in sizes):
        raise bad("sizes", sizes, f"a non-empty list of Flickr size extras from {list(SIZE_KEYS)}")
    for name, value, low, high in (("per_page", per_page, 1, FLICKR_MAX_PER_PAGE), ("max_results", max_results, 0, None),
                                   ("min_size", min_size, 1, None), ("max_pixels", max_pixels, 1, None),
                                   ("max_bytes", max_bytes, 1, None), ("retries", retries, 1, None),
                                   ("workers", workers, 1, None),
                                   ("max_consecutive_failures", max_consecutive_failures, 1, None)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise bad(name, value, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""))
    for name, value in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (name == "timeout" and value == 0):
            raise bad(name, value, "a number of seconds > 0" if name == "timeout" else "a number of seconds >= 0")
    unknown = sorted(set(standin or {}) - set(STANDIN_OPTIONS))
    if unknown:
        raise bad("standin", dict(standin), f"a mapping with keys from {list(STANDIN_OPTIONS)} (unknown: {unknown})")
