"""The team server's secrets: refuse missing, example or weak ones, and make fresh ones.

One check with three callers: `make stack-up` runs it on tracking_server/.env on the
host before `docker compose` starts anything; start_server.py runs it on its own
environment inside the container, where compose hands the secrets over under other
names; `make stack-secrets` writes a .env that passes it. Standard library only, so the
Docker host needs a Python 3 but not the project's .venv.

    python tracking_server/stack_secrets.py check [ENV_FILE]      # exit 1 and say why
    python tracking_server/stack_secrets.py generate [ENV_FILE]   # never overwrites
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import string
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

FOLDER = Path(__file__).resolve().parent
EXAMPLE_FILE = FOLDER / ".env.example"
ENV_FILE = FOLDER / ".env"
# Every secret in .env.example contains this marker, so the container, which has no
# copy of the example, still recognises an example value.
EXAMPLE_MARKER = "change-me"
MIN_PASSWORD_CHARS = 12
MIN_KEY_BITS = 256  # 32 random bytes: 64 hex characters or 43 base64 characters
PASSWORD_COMMAND = 'python3 -c "import secrets; print(secrets.token_urlsafe(24))"'
KEY_COMMAND = 'python3 -c "import secrets; print(secrets.token_hex(32))"'
BASE64_CHARS = set(string.ascii_letters + string.digits + "+/-_")
# A value is refused when its characters carry fewer bits than this (estimated from how
# often each character repeats in it): passwords, and signing keys.
MIN_PASSWORD_ENTROPY_BITS = 32
MIN_KEY_ENTROPY_BITS = 160
# Words and defaults that a guesser tries first: a value made only of these (with digits
# or punctuation around them) is refused, e.g. password1234, minioadminminioadmin.
WEAK_WORDS = frozenset(
    [
        "password",
        "passwd",
        "pass",
        "pwd",
        "admin",
        "administrator",
        "root",
        "user",
        "guest",
        "login",
        "welcome",
        "secret",
        "letmein",
        "changeme",
        "change",
        "me",
        "default",
        "test",
        "demo",
        "example",
        "minio",
        "minioadmin",
        "mlflow",
        "postgres",
        "postgresql",
        "postgre",
        "db",
        "database",
        "server",
        "qwerty",
        "qwertz",
        "azerty",
        "asdf",
        "zxcv",
        "iloveyou",
        "dragon",
        "monkey",
        "master",
        "shadow",
        "sunshine",
        "football",
        "baseball",
        "princess",
        "abc",
        "abcdef",
        "xyz",
        "hello",
        "trustno",
    ]
)


@dataclass(frozen=True)
class Secret:
    """One secret of the stack, by its name in .env and where start_server.py finds it.

    `server_variable` is the variable compose sets from it in the mlflow container;
    `in_uri` says the secret is the password inside that variable's URL.
    """

    name: str
    server_variable: str
    in_uri: bool = False
    is_signing_key: bool = False  # judged by its randomness, not its length alone

    def new_value(self) -> str:
        """A fresh random value; URL-safe, since compose puts the database one in a URL."""
        return secrets.token_hex(32) if self.is_signing_key else secrets.token_urlsafe(24)

    def weakness(self, value: str) -> str | None:
        """Why `value` is too weak for this secret, or None when it is strong enough."""
        if self.is_signing_key:
            if key_bits(value) < MIN_KEY_BITS:
                return "shorter than 32 random bytes (64 hex characters)"
        elif len(value) < MIN_PASSWORD_CHARS:
            return f"shorter than {MIN_PASSWORD_CHARS} characters"
        if made_of_weak_words(value):
            return "a common word or a known default (with digits or symbols around it)"
        needed = MIN_KEY_ENTROPY_BITS if self.is_signing_key else MIN_PASSWORD_ENTROPY_BITS
        bits = entropy_bits(value)
        if bits < needed or len(set(value)) < 5:
            return (
                f"predictable: repeated or sequential characters (about {max(bits, 0):.0f} bits; "
                f"at least {needed} needed)"
            )
        return None

    def server_label(self) -> str:
        """How a refusal inside the container names this secret."""
        where = self.server_variable
        if self.in_uri:
            where = f"the password in {where}"
        if where == self.name:
            return where
        return f"{where} ({self.name} in tracking_server/.env)"


SECRETS = (
    Secret("POSTGRES_PASSWORD", "MLFLOW_BACKEND_STORE_URI", in_uri=True),
    Secret("MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY"),
    Secret("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD"),
    Secret("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_FLASK_SERVER_SECRET_KEY", is_signing_key=True),
)


def key_bits(value: str) -> float:
    """The most random bits `value` can hold, judged by the alphabet it is written in."""
    if all(char in string.hexdigits for char in value):
        alphabet = 16
    elif all(char in BASE64_CHARS for char in value.rstrip("=")):
        alphabet = 64
    else:
        alphabet = 95  # printable ASCII
    return len(value.rstrip("=")) * math.log2(alphabet)


def entropy_bits(value: str) -> float:
    """Bits the value carries, estimated from its characters' frequencies (Shannon) and
    counting a run of consecutive characters (1234, abcd, 4321) as one character."""
    if not value:
        return 0.0
    steps = [ord(b) - ord(a) for a, b in zip(value, value[1:], strict=False)]
    # a character that continues an ascending or descending run adds no surprise
    kept = [value[0]] + [
        char
        for char, step, before in zip(value[1:], steps, [None, *steps], strict=False)
        if not (abs(step) == 1 and step == before)
    ]
    counts = [kept.count(char) for char in set(kept)]
    total = len(kept)
    per_char = -sum(c / total * math.log2(c / total) for c in counts)
    return per_char * total


def made_of_weak_words(value: str) -> bool:
    """True when the letters of value, digits and symbols set aside, are only WEAK_WORDS
    (or a value with no letters at all is short runs of digits such as 1234...)."""
    words = [w for w in "".join(c if c.isalpha() else " " for c in value.lower()).split()]
    if not words:
        return False

    def segmentable(text: str) -> bool:
        ends = {0}
        for end in range(1, len(text) + 1):
            if any(start in ends and text[start:end] in WEAK_WORDS for start in range(end)):
                ends.add(end)
        return len(text) in ends

    return all(segmentable(word) for word in words)


def read_env_file(path: Path) -> dict[str, str]:
    """The NAME=value settings of a compose .env file (comments, blanks and quotes handled).

    Args:
        path: the file, e.g. tracking_server/.env.
    Returns:
        Each name with its value, quotes removed; a later line wins, as in compose.
    """
    settings = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = (part.strip() for part in line.split("=", 1))
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:  # compose drops an inline comment after an unquoted value
            value = value.split(" #", 1)[0].rstrip()
        settings[name.removeprefix("export ").strip()] = value
    return settings


def example_values(example: Path = EXAMPLE_FILE) -> set[str]:
    """Every non-empty value in .env.example (empty when the file is not there)."""
    if not example.exists():
        return set()
    return {value for value in read_env_file(example).values() if value}


def find_problems(values: Mapping[str, str | None], examples: set[str]) -> dict[str, str]:
    """Each secret that is missing, public or weak, with why.

    Args:
        values: the secrets by their .env names (None or "" when missing).
        examples: the values printed in .env.example.
    Returns:
        {.env name: why it is refused}, in SECRETS' order; empty when all are good.
    """
    problems = {}
    for secret in SECRETS:
        value = values.get(secret.name) or ""
        if not value:
            problems[secret.name] = "missing"
        elif EXAMPLE_MARKER in value.lower() or value in examples:
            problems[secret.name] = "a value printed in .env.example"
        elif weakness := secret.weakness(value):
            problems[secret.name] = weakness
    return problems


def server_problems(environ: Mapping[str, str]) -> dict[str, str]:
    """find_problems for start_server.py's environment, keyed by the names it sees there."""
    values = {}
    for secret in SECRETS:
        value = environ.get(secret.server_variable) or ""
        if secret.in_uri and value:
            password = urlsplit(value).password
            value = unquote(password) if password else ""
        values[secret.name] = value
    labels = {secret.name: secret.server_label() for secret in SECRETS}
    return {labels[name]: why for name, why in find_problems(values, example_values()).items()}


def refusal(problems: Mapping[str, str], where: str) -> str:
    """One paragraph that names every setting to change and how to make a good value."""
    listed = "; ".join(f"{name} is {why}" for name, why in problems.items())
    return (
        f"refusing to start the tracking server: change these settings in {where}: {listed}. "
        "Run `make stack-secrets` to write tracking_server/.env with fresh random secrets "
        "(it keeps an existing file: move that aside first), or make each value yourself: "
        f"a password with {PASSWORD_COMMAND}, the secret key with {KEY_COMMAND}. "
        "Nothing was started."
    )


def check_env_file(path: Path) -> str | None:
    """The refusal for the .env file at `path`, or None when its secrets are good."""
    if not path.exists():
        return (
            f"refusing to start the tracking server: {path} does not exist. Run "
            "`make stack-secrets` to write it with fresh random secrets. Nothing was started."
        )
    problems = find_problems(read_env_file(path), example_values())
    return refusal(problems, str(path)) if problems else None


def write_env_file(path: Path, example: Path = EXAMPLE_FILE) -> None:
    """Write `path` from the example with a fresh value for every secret, for its owner only.

    Args:
        path: the .env to create; it must not exist yet.
        example: where the other settings and the comments are copied from.
    Raises:
        FileExistsError: `path` exists; it is left as it was.
    """
    fresh = {secret.name: secret.new_value() for secret in SECRETS}
    lines = []
    for line in example.read_text(encoding="utf-8").splitlines():
        name = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and name in fresh:
            line = f"{name}={fresh.pop(name)}"
        lines.append(line)
    lines += [f"{name}={value}" for name, value in fresh.items()]  # any the example lacks
    # O_EXCL refuses an existing file, even one that appeared a moment ago; 0600 at
    # creation leaves no moment in which others can read the secrets.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(descriptor, 0o600)  # an odd umask could have removed the owner's bits
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write("\n".join(lines) + "\n")
    except BaseException:
        path.unlink(missing_ok=True)  # no half-written secrets file
        raise


def main(argv: list[str] | None = None) -> int:
    """`check` or `generate` a .env file; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("check", "generate"))
    parser.add_argument("env_file", nargs="?", type=Path, default=ENV_FILE)
    args = parser.parse_args(argv)
    env_file: Path = args.env_file

    if args.action == "check":
        message = check_env_file(env_file)
        if message:
            print(f"stack_secrets: {message}", file=sys.stderr)
            return 1
        print(f"stack_secrets: {env_file}: every secret is set, private and strong enough")
        return 0

    try:
        write_env_file(env_file)
    except FileExistsError:
        # Exit 0: the file a user asked for is there, and `make stack-up` checks it. New
        # secrets in an old stack would not reach the volumes anyway (doc/tracking_server.md).
        print(
            f"stack_secrets: {env_file} exists; left unchanged. To make new secrets, move it "
            "aside and run `make stack-secrets` again (a stack that already started keeps its "
            "old passwords: see doc/tracking_server.md)."
        )
        return 0
    names = ", ".join(secret.name for secret in SECRETS)
    print(
        f"stack_secrets: wrote {env_file} (mode 0600) with fresh {names}. Next: make stack-up; "
        "sign in as MLFLOW_AUTH_ADMIN_USERNAME with the MLFLOW_AUTH_ADMIN_PASSWORD in that file."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
