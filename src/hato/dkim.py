"""DKIM: key generation, the DNS TXT records that publish the keys, and message signing.

Keys live under one directory as ``DOMAIN/SELECTOR.rsa.key`` or
``DOMAIN/SELECTOR.ed25519.key`` (PEM, mode 0600), written by ``hato dkim keygen``. Every
key found there signs mail whose ``From:`` header domain is ``DOMAIN``; with an RSA and an
Ed25519 key for one domain each message carries both signatures (RFC 8463 recommends
the pair while receivers learn Ed25519). A selector's DNS record holds one key, so one
selector cannot have both kinds.

Each key has a state, kept beside the keys in ``DOMAIN/.state.json``: ``pending`` (made
by ``hato dkim rotate``, published in DNS but not signing yet), ``active`` (signing) or
``retired`` (replaced; not signing, its record stays published for a grace period so
mail signed with it still verifies). A key the state file does not name is active, so
keys from before rotation keep working. :func:`rotate_key` makes the next key (a
date-based selector), :func:`activate_key` switches to it once DNS publishes it (``hato
dns check`` and ``hato serve`` look), retiring the keys of its algorithm it replaces.

Keys are read and checked once, by :func:`load_signers`, at start-up: a key that cannot
be read or parsed, or a file that does not belong in the directory, is a
:class:`~hato.errors.ConfigError`, never silently unsigned mail. :meth:`DKIMSigner.sign`
does no I/O: relaxed/relaxed canonicalisation, the usual header set with ``From``
over-signed, the signatures prepended to the message bytes, which are unchanged otherwise
unless they hold 8-bit data: that is converted to 7 bit first (RFC 6376 5.3).

dkimpy computes the signatures (its Ed25519 support needs PyNaCl); ``cryptography``
generates and parses the keys. Their exceptions do not leave this module.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import email.utils
import json
import os
import re
import secrets
import stat
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

import dkim  # type: ignore[import-untyped]
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from hato.errors import ConfigError, HatoError
from hato.message import normalize_domain
from hato.mime7bit import NotConvertible, to_7bit


class SigningError(HatoError):
    """A message could not be signed (its header section is malformed for DKIM).

    The intake should refuse such a message (``554 5.6.0``) rather than queue it unsigned.
    """


class Algorithm(StrEnum):
    RSA = "rsa"
    ED25519 = "ed25519"


_SIGNATURE_ALGORITHM = {Algorithm.RSA: b"rsa-sha256", Algorithm.ED25519: b"ed25519-sha256"}

# RFC 6376 5.4.1 "SHOULD be signed", plus List-Unsubscribe-Post (RFC 8058: one-click
# unsubscribe only works when it is signed). Only headers present are signed, each as
# often as it occurs; From is listed once more (over-signed) so no From can be added.
SIGNED_HEADERS: tuple[str, ...] = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "resent-date", "resent-from", "resent-sender", "resent-to",
    "resent-cc", "resent-message-id", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post",
    "list-owner", "list-archive", "feedback-id",
)  # fmt: skip
OVERSIGNED_HEADERS: frozenset[str] = frozenset({"from"})
_SIGNED = frozenset(SIGNED_HEADERS)

RSA_BITS = (1024, 2048, 3072, 4096)
DEFAULT_RSA_BITS = 2048

# A selector is one or more DNS labels (RFC 6376 3.1); no slashes, no leading dot, so it
# is also a safe file name.
_SELECTOR_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*$")
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_KEY_NAME_RE = re.compile(r"^(?P<selector>.+)\.(?P<algorithm>rsa|ed25519)\.key$")
_HEADER_NAME_RE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


# --- names ------------------------------------------------------------------------------


def check_domain(domain: str) -> str:
    """The domain in the form used for ``d=`` and the key directory (lower-case A-labels)."""
    name = normalize_domain(domain)
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL_RE.match(x) for x in labels):
        raise ConfigError(f"DKIM domain {domain!r} is not a domain name")
    return name


def check_selector(selector: str) -> str:
    if not _SELECTOR_RE.match(selector) or len(selector) > 253:
        raise ConfigError(
            f"DKIM selector {selector!r} is not valid: use letters, digits, '-' or '_' "
            "(dot-separated labels)"
        )
    return selector


def key_path(directory: Path, domain: str, selector: str, algorithm: str) -> Path:
    """Where the key of ``selector`` for ``domain`` lives."""
    algo = _algorithm(algorithm)
    return Path(directory) / check_domain(domain) / f"{check_selector(selector)}.{algo}.key"


def _algorithm(value: str) -> Algorithm:
    try:
        return Algorithm(value.lower())
    except ValueError:
        raise ConfigError(f"unknown DKIM algorithm {value!r}: use rsa or ed25519") from None


# --- DNS records ------------------------------------------------------------------------


class DKIMRecord(NamedTuple):
    """The DNS TXT record that publishes one key: ``(domain, selector, txt)``."""

    domain: str
    selector: str
    txt: str

    @property
    def name(self) -> str:
        """The owner name, without the trailing dot: ``SELECTOR._domainkey.DOMAIN``."""
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def algorithm(self) -> str:
        m = re.search(r"(?:^|;)\s*k=([a-z0-9]+)", self.txt)
        return m.group(1) if m else Algorithm.RSA.value

    def strings(self) -> list[str]:
        """The TXT value as DNS character-strings of at most 255 bytes each."""
        return split_txt(self.txt)

    def zone_line(self) -> str:
        """The record in zone-file form, e.g.
        ``s._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; " "p=..." )``."""
        quoted = " ".join(f'"{s}"' for s in self.strings())
        return f"{self.name}. IN TXT ( {quoted} )"


def split_txt(txt: str) -> list[str]:
    """Split a TXT value into character-strings of at most 255 bytes.

    The tags before ``p=`` stay in a string of their own, as registrars' examples show
    them; the key is cut into 255-byte pieces. Receivers concatenate the strings, so
    where the cut falls does not matter (RFC 6376 3.6.2.2).
    """
    head, sep, key = txt.partition("p=")
    if not sep:
        head, key = "", txt
    else:
        key = sep + key
    out = [head] if head else []
    while key:
        out.append(key[:255])
        key = key[255:]
    return out


def txt_record(algorithm: str, public_key: bytes) -> str:
    """The TXT value for a public key: DER SubjectPublicKeyInfo for RSA, the raw 32
    bytes for Ed25519 (RFC 8463 4.2)."""
    algo = _algorithm(algorithm)
    return f"v=DKIM1; k={algo.value}; p={base64.b64encode(public_key).decode('ascii')}"


# --- keys -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DKIMKey:
    """One loaded signing key. ``private`` is in the form dkimpy takes: PKCS#1 PEM for
    RSA, the base64 seed for Ed25519."""

    domain: str
    selector: str
    algorithm: Algorithm
    private: bytes
    record: DKIMRecord
    path: Path

    def __repr__(self) -> str:  # never print key material
        return f"DKIMKey({self.domain!r}, {self.selector!r}, {self.algorithm.value!r})"


PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def _key_material(algorithm: Algorithm, key: PrivateKey) -> tuple[bytes, bytes]:
    """(what dkimpy signs with, the public key bytes for the TXT record)."""
    if algorithm is Algorithm.RSA:
        assert isinstance(key, rsa.RSAPrivateKey)
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return private, public
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(seed), public


def _parse_key(path: Path, algorithm: Algorithm, pem: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"DKIM key {path} is not a PEM private key without a password: {exc}"
        ) from None
    if algorithm is Algorithm.RSA:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"DKIM key {path} is named .rsa.key but is not an RSA key")
        if key.key_size < 1024:
            raise ConfigError(
                f"DKIM key {path} has {key.key_size} bits; RFC 8301 requires 1024 or more"
            )
        return key
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"DKIM key {path} is named .ed25519.key but is not an Ed25519 key")
    return key


def _write_new(path: Path, data: bytes, *, force: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically; refuse to replace an
    existing file unless ``force``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists: no race with a concurrent keygen
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def generate_key(
    domain: str,
    selector: str,
    algorithm: str = "rsa",
    *,
    directory: Path,
    bits: int = DEFAULT_RSA_BITS,
    force: bool = False,
) -> DKIMRecord:
    """Create a key as ``DIRECTORY/DOMAIN/SELECTOR.ALGORITHM.key`` (0600) and return the
    DNS record that publishes it.

    Refuses (``ConfigError``) to overwrite an existing key unless ``force``, and to give
    one selector both an RSA and an Ed25519 key (its DNS record holds one key).
    """
    algo = _algorithm(algorithm)
    name = check_domain(domain)
    check_selector(selector)
    path = key_path(directory, name, selector, algo)
    other = key_path(directory, name, selector, next(a for a in Algorithm if a is not algo))
    if other.exists():
        raise ConfigError(
            f"selector {selector!r} of {name} already has a key ({other}); "
            "use another selector for the second algorithm"
        )
    if path.exists() and not force:
        raise ConfigError(f"DKIM key {path} exists; use --force to replace it")
    key: PrivateKey
    if algo is Algorithm.RSA:
        if bits not in RSA_BITS:
            raise ConfigError(f"RSA key size must be one of {', '.join(map(str, RSA_BITS))}")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        encoding = serialization.PrivateFormat.TraditionalOpenSSL
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        encoding = serialization.PrivateFormat.PKCS8
    pem = key.private_bytes(serialization.Encoding.PEM, encoding, serialization.NoEncryption())
    try:
        for d in (Path(directory), path.parent):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write DKIM key {path}: {exc.strerror or exc}") from None
    try:
        _write_new(path, pem, force=force)
    except FileExistsError:
        raise ConfigError(f"DKIM key {path} exists; use --force to replace it") from None
    except OSError as exc:
        raise ConfigError(f"cannot write DKIM key {path}: {exc.strerror or exc}") from None
    _, public = _key_material(algo, key)
    return DKIMRecord(name, selector, txt_record(algo, public))


def _scan(directory: Path) -> list[tuple[Path, str, str, Algorithm]]:
    """Every key file under ``directory`` as (path, domain, selector, algorithm); a file
    or directory that does not fit the layout is a ConfigError."""
    found: list[tuple[Path, str, str, Algorithm]] = []
    try:
        domain_dirs = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(
            f"cannot read DKIM directory {directory}: {exc.strerror or exc}"
        ) from None
    for ddir in domain_dirs:
        if not ddir.is_dir():
            raise ConfigError(
                f"unexpected file {ddir} in the DKIM directory: keys go in DOMAIN/SELECTOR.rsa.key"
            )
        try:
            domain = check_domain(ddir.name)
        except ConfigError:
            raise ConfigError(f"DKIM directory {ddir} is not named after a domain") from None
        if domain != ddir.name:
            raise ConfigError(f"DKIM directory {ddir} should be named {domain}")
        try:
            files = sorted(p for p in ddir.iterdir() if not p.name.startswith("."))
        except OSError as exc:
            raise ConfigError(f"cannot read DKIM directory {ddir}: {exc.strerror or exc}") from None
        if not files:
            raise ConfigError(
                f"DKIM directory {ddir} holds no key: add one with hato dkim keygen or remove "
                "the directory to stop signing for this domain"
            )
        selectors: dict[str, Path] = {}
        for path in files:
            m = _KEY_NAME_RE.match(path.name)
            if m is None:
                raise ConfigError(
                    f"unexpected file {path} in the DKIM directory: key files are named "
                    "SELECTOR.rsa.key or SELECTOR.ed25519.key"
                )
            selector = m.group("selector")
            try:
                check_selector(selector)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
            if selector in selectors:
                raise ConfigError(
                    f"DKIM selector {selector!r} of {domain} has two keys ({selectors[selector]}, "
                    f"{path}); its DNS record can publish only one"
                )
            selectors[selector] = path
            found.append((path, domain, selector, Algorithm(m.group("algorithm"))))
    return found


def load_key(path: Path, domain: str, selector: str, algorithm: Algorithm) -> DKIMKey:
    """Read and check one key; ConfigError with one clear line when it cannot be used."""
    try:
        info = path.stat()  # follows symlinks: a dangling link is a missing key
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"DKIM key {path} is not a regular file")
        pem = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"DKIM key {path} is missing") from None
    except PermissionError:
        raise ConfigError(f"DKIM key {path} is not readable by this user") from None
    except OSError as exc:
        raise ConfigError(f"cannot read DKIM key {path}: {exc.strerror or exc}") from None
    key = _parse_key(path, algorithm, pem)
    private, public = _key_material(algorithm, key)
    loaded = DKIMKey(
        domain,
        selector,
        algorithm,
        private,
        DKIMRecord(domain, selector, txt_record(algorithm, public)),
        path,
    )
    try:  # prove now that dkimpy accepts the key, not on the first message
        _sign_one(loaded, b"From: a@" + domain.encode() + b"\r\n\r\nprobe\r\n", [b"from"])
    except SigningError as exc:
        raise ConfigError(f"DKIM key {path} cannot sign: {exc}") from None
    return loaded


def dkim_txt_records(directory: Path) -> list[DKIMRecord]:
    """The DNS TXT records of every key under ``directory`` (pending, active and retired:
    all are to be published): ``(domain, selector, txt)`` tuples, sorted by domain and
    selector. A missing directory has none."""
    keys = sorted(load_keys(directory), key=lambda ks: key_order(ks[0]))
    return [key.record for key, _status in keys]


def key_order(key: DKIMKey) -> tuple[str, bool, str]:
    """Domain, RSA first, then selector: the order keys sign and are listed in."""
    return (key.domain, key.algorithm is not Algorithm.RSA, key.selector)


def load_keys(directory: Path) -> list[tuple[DKIMKey, KeyStatus]]:
    """Every key under ``directory`` with its state (see :func:`load_signers`)."""
    directory = Path(directory)
    entries = _scan(directory)
    states: dict[str, dict[str, KeyStatus]] = {}
    out = []
    for path, domain, selector, algorithm in entries:
        if domain not in states:
            states[domain] = read_states(directory, domain)
        status = states[domain].get(selector, KeyStatus(KeyState.ACTIVE, 0.0))
        out.append((load_key(path, domain, selector, algorithm), status))
    return out


def load_signers(directory: Path) -> DKIMSigner:
    """Load the active keys under ``directory`` (none if it does not exist).

    Raises :class:`ConfigError` for a key that is missing, unreadable or unusable, and for
    any file that does not belong in the layout.
    """
    return DKIMSigner(
        key for key, status in load_keys(directory) if status.state is KeyState.ACTIVE
    )


# --- key states and rotation ------------------------------------------------------------


class KeyState(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    RETIRED = "retired"


STATE_FILE = ".state.json"
GRACE_DAYS = 7  # how long a retired key's record stays published, at least


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """A key's state and since when (epoch seconds; 0 for a key from before rotation)."""

    state: KeyState
    since: float

    def remove_after(self) -> float | None:
        """When a retired key's DNS record may go."""
        if self.state is not KeyState.RETIRED:
            return None
        return self.since + GRACE_DAYS * 86400


def read_states(directory: Path, domain: str) -> dict[str, KeyStatus]:
    """The states of ``domain``'s keys named in its state file (others are active)."""
    path = Path(directory) / check_domain(domain) / STATE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read DKIM key states {path}: {exc}") from None
    out: dict[str, KeyStatus] = {}
    try:
        for selector, entry in dict(raw).items():
            out[str(selector)] = KeyStatus(KeyState(entry["state"]), float(entry["since"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"DKIM key states {path} are malformed: {exc}") from None
    return out


def write_states(directory: Path, domain: str, states: dict[str, KeyStatus]) -> None:
    path = Path(directory) / check_domain(domain) / STATE_FILE
    data = {s: {"state": st.state.value, "since": st.since} for s, st in sorted(states.items())}
    try:
        _write_new(path, (json.dumps(data, indent=1) + "\n").encode(), force=True)
    except OSError as exc:
        raise ConfigError(f"cannot write DKIM key states {path}: {exc.strerror or exc}") from None


def next_selector(existing: Container[str], algorithm: str, today: datetime.date) -> str:
    """A date-based selector for a new key: ``rsa20261203`` / ``ed20261203``, with a
    ``-2``, ``-3``… suffix when that is taken."""
    algo = _algorithm(algorithm)
    base = f"{'rsa' if algo is Algorithm.RSA else 'ed'}{today:%Y%m%d}"
    candidate, n = base, 1
    while candidate in existing:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def rotate_key(
    directory: Path,
    domain: str,
    *,
    now: float,
    algorithm: str | None = None,
    selector: str | None = None,
    bits: int = DEFAULT_RSA_BITS,
) -> list[DKIMRecord]:
    """Make the next key of ``domain`` (one per algorithm in use, or ``algorithm``), in
    state pending; the records to publish. Refuses while a rotation is under way (a
    pending key of that algorithm exists)."""
    directory = Path(directory)
    name = check_domain(domain)
    keys = [(k, st) for k, st in load_keys(directory) if k.domain == name]
    if algorithm is not None:
        algorithms = [_algorithm(algorithm)]
    else:
        algorithms = sorted(
            {k.algorithm for k, st in keys if st.state is KeyState.ACTIVE}, key=lambda a: a.value
        ) or [Algorithm.RSA]
    if selector is not None and len(algorithms) > 1:
        raise ConfigError("--selector names one key: give --algorithm too")
    for algo in algorithms:
        pending = [k for k, st in keys if st.state is KeyState.PENDING and k.algorithm is algo]
        if pending:
            raise ConfigError(
                f"a rotation of {name}'s {algo.value} key is under way: publish "
                f"{pending[0].record.name} and run hato dns check {name}"
            )
    states = read_states(directory, name)
    taken = {k.selector for k, _ in keys}
    today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
    made: list[tuple[str, DKIMRecord]] = []
    for algo in algorithms:
        chosen = selector or next_selector(taken, algo, today)
        record = generate_key(name, chosen, algo.value, directory=directory, bits=bits)
        taken.add(chosen)
        made.append((chosen, record))
        states[chosen] = KeyStatus(KeyState.PENDING, now)
        # A key with no entry is active: name the current ones, so the file says it all.
        for key, status in keys:
            states.setdefault(key.selector, status)
        write_states(directory, name, states)
    return [record for _, record in made]


def pending_keys(directory: Path, domain: str) -> list[DKIMKey]:
    return [
        k
        for k, st in load_keys(directory)
        if k.domain == check_domain(domain) and st.state is KeyState.PENDING
    ]


def activate_key(directory: Path, domain: str, selector: str, *, now: float) -> list[str]:
    """Make a pending key active and retire the active keys of its algorithm; what
    changed, as sentences for the operator."""
    directory = Path(directory)
    name = check_domain(domain)
    keys = {k.selector: (k, st) for k, st in load_keys(directory) if k.domain == name}
    if selector not in keys:
        raise ConfigError(f"no DKIM key {selector!r} for {name}")
    key, status = keys[selector]
    if status.state is not KeyState.PENDING:
        return []
    states = {s: st for s, (_k, st) in keys.items()}
    states[selector] = KeyStatus(KeyState.ACTIVE, now)
    changes = [f"{name} selector {selector}: pending -> active (signs from now on)"]
    until = datetime.datetime.fromtimestamp(now + GRACE_DAYS * 86400, datetime.UTC)
    for other, (other_key, other_status) in sorted(keys.items()):
        if (
            other != selector
            and other_key.algorithm is key.algorithm
            and other_status.state is KeyState.ACTIVE
        ):
            states[other] = KeyStatus(KeyState.RETIRED, now)
            changes.append(
                f"{name} selector {other}: active -> retired (keep its DNS record published "
                f"until at least {until:%Y-%m-%d}, then remove it and the key file)"
            )
    write_states(directory, name, states)
    return changes


class DKIMKeys:
    """The keys of a directory as ``hato serve`` signs with them: :attr:`signer` holds the
    active keys; :meth:`refresh` loads them again when a state file or key file changed
    (a key activated by ``hato dns check`` or by the server's own check)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._stamp = self._look()
        self.keys = load_keys(self.directory)
        self.signer = DKIMSigner(k for k, st in self.keys if st.state is KeyState.ACTIVE)

    def _look(self) -> tuple[tuple[str, int], ...]:
        seen: list[tuple[str, int]] = []
        try:
            for ddir in sorted(self.directory.iterdir()):
                if not ddir.is_dir():
                    continue
                for path in sorted(ddir.iterdir()):
                    if path.name == STATE_FILE or not path.name.startswith("."):
                        with contextlib.suppress(OSError):
                            seen.append((str(path), path.stat().st_mtime_ns))
        except OSError:
            pass
        return tuple(seen)

    def pending_domains(self) -> list[str]:
        return sorted({k.domain for k, st in self.keys if st.state is KeyState.PENDING})

    def refresh(self) -> bool:
        """Reload when anything changed; True when it did. A directory that no longer
        loads raises :class:`ConfigError` and the keys in use stay."""
        stamp = self._look()
        if stamp == self._stamp:
            return False
        keys = load_keys(self.directory)
        self._stamp = stamp
        self.keys = keys
        self.signer = DKIMSigner(k for k, st in keys if st.state is KeyState.ACTIVE)
        return True


# --- signing ----------------------------------------------------------------------------


def _header_section(data: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        idx = data.find(sep)
        if idx >= 0:
            return data[: idx + len(sep) // 2]
    if data.startswith((b"\r\n", b"\n")):
        return b""
    return data


def _headers(data: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, unfolded value) of each header field, in order."""
    out: list[tuple[str, bytes]] = []
    for line in re.split(rb"\r?\n", _header_section(data)):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if out:
                out[-1] = (out[-1][0], out[-1][1] + b" " + line.strip())
            continue
        m = _HEADER_NAME_RE.match(line)
        if m is not None:
            out.append((m.group(1).decode("ascii").lower(), line[m.end() :].strip()))
    return out


def from_addresses(data: bytes) -> list[str]:
    """The addresses of the ``From:`` header, in order.

    A message with no From or more than one From field has none: RFC 5322 allows
    exactly one, and signing an ambiguous author would vouch for the wrong one.
    """
    values = [value for name, value in _headers(data) if name == "from"]
    if len(values) != 1:
        return []
    text = values[0].decode("utf-8", "replace")
    return [addr for _name, addr in email.utils.getaddresses([text]) if "@" in addr]


def from_domains(data: bytes) -> list[str]:
    """The domains of the ``From:`` header's addresses, normalised, in order, each once."""
    domains: list[str] = []
    for addr in from_addresses(data):
        domain = addr.rpartition("@")[2]
        if not domain:
            continue
        domain = normalize_domain(domain)
        if domain not in domains:
            domains.append(domain)
    return domains


def _sign_one(key: DKIMKey, data: bytes, include: Sequence[bytes]) -> bytes:
    try:
        header: bytes = dkim.sign(
            data,
            key.selector.encode("ascii"),
            key.domain.encode("ascii"),
            key.private,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=_SIGNATURE_ALGORITHM[key.algorithm],
            include_headers=list(include),
            linesep=b"\r\n",
        )
    except Exception as exc:  # dkimpy raises DKIMException, IndexError, ValueError, ...
        raise SigningError(f"{type(exc).__name__}: {exc}") from None
    return header


class DKIMSigner:
    """Signs messages with the keys of their From domain. Pure: no I/O after loading."""

    def __init__(self, keys: Iterable[DKIMKey] = ()) -> None:
        self.keys: tuple[DKIMKey, ...] = tuple(sorted(keys, key=key_order))
        by_domain: dict[str, list[DKIMKey]] = {}
        for key in self.keys:
            by_domain.setdefault(key.domain, []).append(key)
        self._by_domain = {d: tuple(ks) for d, ks in by_domain.items()}

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(self._by_domain)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __repr__(self) -> str:
        return f"DKIMSigner({list(self.keys)!r})"

    def keys_for(self, data: bytes, domains: Container[str] | None = None) -> list[DKIMKey]:
        """The keys that would sign ``data`` (only for ``domains``, when given)."""
        return [
            k
            for d in from_domains(data)
            if domains is None or d in domains
            for k in self._by_domain.get(d, ())
        ]

    def sign(self, data: bytes, *, domains: Container[str] | None = None) -> bytes:
        """``data`` with a DKIM-Signature for each key of its From domain prepended;
        unchanged when the From domain has no key. ``domains`` (normalised, lower-case)
        limits signing to From domains the submitter may use, so one user cannot get
        mail signed for another hosted domain. Raises :class:`SigningError` when a
        message that should be signed cannot be.

        A message with 8-bit data is converted to 7 bit before it is signed (RFC 6376
        5.3, :mod:`hato.mime7bit`), so that no next hop without 8BITMIME has to change
        what the signature covers; one that cannot be converted is signed as it is."""
        if not self._by_domain:
            return data
        keys = self.keys_for(data, domains)
        if not keys:
            return data
        with contextlib.suppress(NotConvertible):  # then signed as it is, 8-bit
            data = to_7bit(data)
        present = [name for name, _ in _headers(data) if name in _SIGNED]
        include = [n.encode("ascii") for n in present]
        include += [n.encode("ascii") for n in dict.fromkeys(present) if n in OVERSIGNED_HEADERS]
        signatures = [_sign_one(key, data, include) for key in keys]
        return b"".join(signatures) + data
